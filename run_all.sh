#!/usr/bin/env bash
# Full reproduction: prepare -> split -> train (every fold of every member) -> ensemble.
# prepare: the data stage (faces, edits, diffusion fakes; python -m data_prep).
# With no competition data in configs/data.yaml it runs on the demo sample, on a CPU.
# Each stage skips work whose outputs exist; --force redoes everything.
#
#   bash run_all.sh                       # set up .venv if needed, then run every stage
#   bash run_all.sh --force               # rebuild every output
#   bash run_all.sh --pretrained DIR      # read every pretrained part from DIR (python -m models.fetch_pretrained)
set -euo pipefail
cd "$(dirname "$0")"
FORCE=()
PRETRAINED=""
while [ $# -gt 0 ]; do
  case "$1" in
    --force) FORCE=(--force) ;;
    --pretrained) PRETRAINED="${2:?run_all.sh: --pretrained needs the folder python -m models.fetch_pretrained wrote}"; shift ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "run_all.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
# The overrides models.fetch_pretrained wrote for one member (or `data`): one key=value a line.
overrides() { if [ -n "$PRETRAINED" ] && [ -f "$PRETRAINED/overrides/$1.txt" ]; then cat "$PRETRAINED/overrides/$1.txt"; fi; }
bash setup_env.sh
PY=.venv/bin/python

stage() { printf '\n== %s ==\n' "$1"; }

stage "prepare"
setting() { $PY -c "import yaml; print(yaml.safe_load(open('configs/data.yaml'))['data'].get('$1') or '')"; }
if [ -n "$(setting use_prepared)" ]; then
  # faces -> image edits -> Stable Diffusion fakes (skipped without a model) -> manifest;
  # builds the demo sample first when no competition data is configured
  $PY -m data_prep --config configs/data.yaml "${FORCE[@]}"
elif [ -z "$(setting train_labels)" ]; then
  $PY -m data_prep.demo --out data/demo "${FORCE[@]}"
else
  echo "training on the labels in configs/data.yaml as they are (data.use_prepared is off)"
fi

stage "split"
mapfile -t SPLIT_OVERRIDES < <(overrides data)
$PY cv_split.py "${FORCE[@]}" "${SPLIT_OVERRIDES[@]}"

stage "train"
mapfile -t MEMBERS < <($PY ensemble.py --list-members)
for member in "${MEMBERS[@]}"; do
  mapfile -t MEMBER_OVERRIDES < <(overrides "$member")
  $PY train.py --config "configs/members/$member.yaml" --fold all "${FORCE[@]}" "${MEMBER_OVERRIDES[@]}"
done

stage "ensemble"
$PY ensemble.py
example=$(ls data/demo/test/* 2>/dev/null | head -n 1 || true)
printf '\nDone. Score any image with:\n  .venv/bin/python infer.py %s\n' "${example:-path/to/image.jpg}"
