"""The blend of members: their predictions and the submission (`predictions`), fitting a blend
and its calibration (`fitting`), a fitted blend applied with NumPy alone (`applied`) and the
report (`report`). Uses the ground only."""
