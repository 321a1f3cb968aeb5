import pytest
import torch

from core.checkpoint import CheckpointError, load_state, load_weights, save_state, save_weights


def test_weights_round_trip(tmp_path):
    state = {"a.weight": torch.randn(3, 4), "a.bias": torch.arange(3.0)}
    path = save_weights(state, tmp_path / "m.safetensors", {"epoch": 3})
    back = load_weights(path)
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)


def test_pickle_is_refused(tmp_path):
    path = tmp_path / "m.pt"
    torch.save({"w": torch.ones(2)}, path)
    with pytest.raises(CheckpointError, match="m.pt: not a safetensors file; refusing to load a pickle"):
        load_weights(path)


def test_a_pretrained_pickle_is_read_weights_only(tmp_path):
    """Pretrained pickles go through models.weight_files: its tensors only, never its code."""
    from models.weight_files import read_weights

    class Evil:
        def __reduce__(self):
            return (print, ("code ran",))

    path = tmp_path / "evil.pth"
    torch.save({"w": Evil()}, path)
    with pytest.raises(CheckpointError, match=r"evil.pth: refused by .*: it needs print; only tensors"):
        read_weights(path)
    torch.save({"state_dict": {"w": torch.ones(2)}}, path)
    assert torch.equal(read_weights(path)[1]["w"], torch.ones(2))


def test_corrupt_safetensors(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(CheckpointError, match="bad.safetensors: corrupt"):
        load_weights(path)


def test_nested_training_state_round_trip(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = {"optimizer": opt.state_dict(), "epoch": 2, "history": [{"auc": 0.5}], "t": (1, "x")}
    back = load_state(save_state(state, tmp_path / "s.safetensors"))
    assert back["epoch"] == 2 and back["history"] == [{"auc": 0.5}] and back["t"] == (1, "x")
    assert torch.equal(back["optimizer"]["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    opt2 = torch.optim.AdamW(model.parameters())
    opt2.load_state_dict(back["optimizer"])  # loads: keys and types survived
    assert opt2.state_dict()["param_groups"][0]["lr"] == opt.state_dict()["param_groups"][0]["lr"]
