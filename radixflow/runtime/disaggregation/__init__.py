"""Prefill/decode disaggregation (Splitwise, DistServe): `--disaggregation-mode prefill|decode` (transfer.py)."""
