"""The CI workflows users run: checked with actionlint, and holding what the README promises."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
ACTIONLINT = ROOT / ".venv" / "actionlint" / "package" / "node.cjs"
LINT = """
const { createLinter } = require(process.argv[1]);
const fs = require("fs");
createLinter().then((lint) => {
  const found = process.argv.slice(2).flatMap((f) => lint(fs.readFileSync(f, "utf8"), f));
  console.log(JSON.stringify(found));
});
"""

needs_actionlint = pytest.mark.skipif(
    not ACTIONLINT.exists() or shutil.which("node") is None,
    reason="actionlint and nodejs come from ./scripts/setup.sh",
)


def actionlint(*files: Path) -> list[dict]:
    result = subprocess.run(
        ["node", "-e", LINT, str(ACTIONLINT), *map(str, files)], capture_output=True, text=True, timeout=120, check=True
    )
    return json.loads(result.stdout)


@needs_actionlint
def test_the_workflows_pass_actionlint():
    assert len(WORKFLOWS) == 3
    assert actionlint(*WORKFLOWS) == []


@needs_actionlint
def test_actionlint_catches_a_broken_workflow(tmp_path):
    broken = tmp_path / "broken.yml"
    broken.write_text(
        "on: push\njobs:\n  x:\n    runs-on: ubuntu-latest\n    steps:\n      - run: echo ${{ github.evnt }}\n"
    )
    assert any('"evnt" is not defined' in problem["message"] for problem in actionlint(broken))


def test_previews_run_only_for_branches_of_this_repository_with_a_read_only_role():
    text = (ROOT / ".github" / "workflows" / "pull-request.yml").read_text()
    assert "if: github.event.pull_request.head.repo.full_name == github.repository" in text
    assert "secrets.AWS_PREVIEW_ROLE_ARN" in text and "AWS_DEPLOY_ROLE_ARN" not in text
    assert "policyPacks: policy" in text and "pull_request_target" not in text


def test_no_workflow_uses_long_lived_aws_keys():
    for workflow in WORKFLOWS:
        text = workflow.read_text()
        assert "AWS_SECRET_ACCESS_KEY" not in text and "aws-access-key-id" not in text, workflow.name
        if "configure-aws-credentials" in text:
            assert "id-token: write" in text and "role-to-assume" in text, workflow.name
