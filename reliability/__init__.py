"""Reliability runs for failclosed-pep: an open-loop soak through real `pep run` processes while the PDPs and
the upstream misbehave, checked against the decision logs, the upstream's records and /proc (issue 9).

`python -m reliability --mode smoke` (about 20 s of load, CI) or `--mode full` (300 requests/s for 5 minutes);
see docs/reliability.md.
"""
