"""The bad-spec table in the cluster, with the operator running (bench/bad_specs.py): every bad object
is refused at admission or given a condition that names the field; nothing is left behind; the
operator does not loop, stays up and never repeats a token."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

import bad_specs  # noqa: E402

from test_invalid import CASES  # noqa: E402

pytestmark = pytest.mark.e2e


def test_every_bad_spec_is_refused_or_failed_and_nothing_is_left_behind(
    control_plane: Any, namespace: str, crd: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    summary = bad_specs.run(bad_specs.Kubectl.of(control_plane), namespace, quiet_seconds=8, workdir=tmp_path)
    with capsys.disabled():
        print(f"\n[bad specs]\n{summary.table()}\n{summary.totals()}")

    # Every case of the table ran, and the raw bytes too; each one is accounted for.
    assert sorted(o.case.id for o in summary.outcomes if o.case.kind == "table") == sorted(
        c[0] for c in CASES
    )
    assert {o.case.id for o in summary.outcomes if o.case.kind == "raw"} >= {"alias-bomb", "binary-token"}
    # Admitted objects: each has a failure condition from the operator whose message names the field.
    assert summary.slipped == []
    unnamed = [(o.case.id, o.case.field, o.message) for o in summary.failed if not o.names_field]
    assert unnamed == []
    # Both kinds of outcome occur: the CRD refuses most (a token in a prompt included); a token in
    # base64 passes it (CEL cannot decode base64) and reaches the operator, which fails it by where it is.
    by_id = {o.case.id: o for o in summary.outcomes}
    assert by_id["inline-hf-token-anywhere"].refused_by == "API server"
    assert by_id["token-in-base64"].reason == "InvalidSpec"
    # kubectl decodes !!binary into a string, which the CRD's token rule then refuses by its field.
    binary = by_id["binary-token"]
    assert (
        binary.refused_by == "API server"
        and "spec.samples.prompts: Invalid value: looks like a Hugging Face token" in binary.message
    )
    assert by_id["alias-bomb"].refused_by == "kubectl" and "aliasing" in by_id["alias-bomb"].message
    assert by_id["over-request-limit"].refused_by == "API server"
    # No orphans, before and after deleting every FineTuneJob.
    assert not any(summary.orphans.values()), summary.orphans
    assert not any(summary.orphans_after_delete.values()), summary.orphans_after_delete
    # No hot loop: flat over the quiet window.
    assert summary.quiet_requests <= bad_specs.QUIET_MAX_REQUESTS
    assert summary.quiet_reconciles <= bad_specs.QUIET_MAX_REQUESTS
    # The operator stayed up, and said nothing it should not have.
    assert summary.operator_alive and summary.operator_restarts == 0
    assert summary.health_checks > 0 and summary.health_failures == []
    assert summary.log_problems == []
    assert summary.leaks == []
    assert summary.problems == []
