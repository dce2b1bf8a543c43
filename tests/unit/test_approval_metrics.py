"""Approvals and just-in-time credential fetches are counted from start, with closed label values."""

from __future__ import annotations

import inspect

from prometheus_client import generate_latest

import pep.approvals.flow
import pep.credentials_oauth
from pep.metrics import APPROVAL_RESULTS, CREDENTIAL_FETCH_RESULTS, Metrics


def test_every_result_exists_at_zero() -> None:
    text = generate_latest(Metrics(("r",)).registry).decode()
    for result in APPROVAL_RESULTS:
        assert f'pep_approvals_total{{result="{result}"}} 0.0' in text
    for result in CREDENTIAL_FETCH_RESULTS:
        assert f'pep_credential_fetches_total{{result="{result}"}} 0.0' in text


def test_the_results_reported_are_the_labels_that_exist() -> None:
    flow = inspect.getsource(pep.approvals.flow)
    said = {word for word in APPROVAL_RESULTS if f'"{word}"' in flow}
    assert said == set(APPROVAL_RESULTS)
    fetches = inspect.getsource(pep.credentials_oauth)
    assert {w for w in ("success", "refused", "error") if f'"{w}"' in fetches} == set(CREDENTIAL_FETCH_RESULTS)
