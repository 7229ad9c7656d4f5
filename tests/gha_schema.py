"""A structural check of GitHub Actions workflow files (the subset of the workflow syntax we rely on).

`check_workflow(doc)` returns a list of problems (empty when valid) for a workflow parsed with
``yaml.safe_load``. It checks the top-level keys (``on`` and ``jobs`` required), the triggers, each job
(``runs-on`` and a non-empty ``steps`` list, or ``uses`` for a reusable workflow; known keys only), each step
(exactly one of ``uses``/``run``, known keys, ``uses`` of the form ``owner/repo@ref``, ``./path`` or
``docker://...``, ``with``/``env`` maps of scalars, unique ``id``), balanced ``${{ }}`` expressions, and that
``steps.<id>`` and ``needs.<job>`` references name an existing step or job.
"""

from __future__ import annotations

import re

TOP_KEYS = {"name", "run-name", "on", "permissions", "env", "defaults", "concurrency", "jobs"}
EVENTS = {
    "branch_protection_rule", "check_run", "check_suite", "create", "delete", "deployment",
    "deployment_status", "discussion", "discussion_comment", "fork", "gollum", "issue_comment", "issues",
    "label", "merge_group", "milestone", "page_build", "public", "pull_request", "pull_request_review",
    "pull_request_review_comment", "pull_request_target", "push", "registry_package", "release",
    "repository_dispatch", "schedule", "status", "watch", "workflow_call", "workflow_dispatch",
    "workflow_run",
}
JOB_KEYS = {"name", "permissions", "needs", "if", "runs-on", "environment", "concurrency", "outputs", "env",
            "defaults", "steps", "timeout-minutes", "strategy", "continue-on-error", "container", "services",
            "uses", "with", "secrets"}
STEP_KEYS = {"id", "if", "name", "uses", "run", "shell", "with", "env", "continue-on-error",
             "timeout-minutes", "working-directory"}
ID = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
USES = re.compile(r"^(\./\S+|docker://\S+|[A-Za-z0-9_.-]+/[A-Za-z0-9_./-]+@[A-Za-z0-9_./-]+)$")
SCALAR = (str, int, float, bool)


def _expressions(text: str, where: str, problems: list[str]) -> list[str]:
    """The bodies of the ``${{ ... }}`` expressions in ``text`` (and a problem for an unclosed one)."""
    bodies = []
    rest = text
    while "${{" in rest:
        rest = rest[rest.index("${{") + 3:]
        if "}}" not in rest:
            problems.append(f"{where}: unclosed '${{{{' expression")
            break
        body, rest = rest.split("}}", 1)
        if not body.strip():
            problems.append(f"{where}: empty '${{{{ }}}}' expression")
        bodies.append(body)
    return bodies


def _strings(node, path: str):
    if isinstance(node, str):
        yield path, node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from _strings(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _strings(value, f"{path}[{i}]")


def _check_map_of_scalars(node, where: str, problems: list[str]) -> None:
    if not isinstance(node, dict):
        problems.append(f"{where}: must be a mapping")
        return
    for key, value in node.items():
        if not isinstance(value, SCALAR):
            problems.append(f"{where}.{key}: must be a string, number or boolean")


def _check_on(on, problems: list[str]) -> None:
    if isinstance(on, str):
        on = [on]
    if isinstance(on, list):
        names = on
    elif isinstance(on, dict):
        names = list(on)
        for event, config in on.items():
            if config is not None and not isinstance(config, (dict, list)):
                problems.append(f"on.{event}: must be empty, a mapping or a list")
    else:
        problems.append("on: must be an event name, a list of events or a mapping")
        return
    if not names:
        problems.append("on: no trigger")
    for event in names:
        if event not in EVENTS:
            problems.append(f"on: unknown event {event!r}")


def _check_step(step, where: str, ids: set[str], problems: list[str]) -> None:
    if not isinstance(step, dict):
        problems.append(f"{where}: a step must be a mapping")
        return
    for key in set(step) - STEP_KEYS:
        problems.append(f"{where}: unknown key {key!r}")
    if ("uses" in step) == ("run" in step):
        problems.append(f"{where}: needs exactly one of 'uses' or 'run'")
    if "uses" in step and not (isinstance(step["uses"], str) and USES.match(step["uses"])):
        problems.append(f"{where}.uses: {step['uses']!r} is not owner/repo@ref, ./path or docker://image")
    if "run" in step and not (isinstance(step["run"], str) and step["run"].strip()):
        problems.append(f"{where}.run: must be a non-empty string")
    if "with" in step:
        if "run" in step:
            problems.append(f"{where}: 'with' only applies to 'uses' steps")
        _check_map_of_scalars(step["with"], f"{where}.with", problems)
    if "env" in step:
        _check_map_of_scalars(step["env"], f"{where}.env", problems)
    if "id" in step:
        if not (isinstance(step["id"], str) and ID.match(step["id"])):
            problems.append(f"{where}.id: {step['id']!r} is not a valid id")
        elif step["id"] in ids:
            problems.append(f"{where}.id: duplicate id {step['id']!r}")
        else:
            ids.add(step["id"])


def _check_job(job_id: str, job, job_ids: set[str], problems: list[str]) -> None:
    where = f"jobs.{job_id}"
    if not ID.match(job_id):
        problems.append(f"{where}: invalid job id")
    if not isinstance(job, dict):
        problems.append(f"{where}: must be a mapping")
        return
    for key in set(job) - JOB_KEYS:
        problems.append(f"{where}: unknown key {key!r}")
    needs = job.get("needs", [])
    for need in [needs] if isinstance(needs, str) else needs:
        if need not in job_ids:
            problems.append(f"{where}.needs: no job {need!r}")
    if "uses" in job:  # a reusable-workflow call has no runs-on/steps
        return
    if "runs-on" not in job:
        problems.append(f"{where}: missing 'runs-on'")
    elif not isinstance(job["runs-on"], (str, list, dict)) or not job["runs-on"]:
        problems.append(f"{where}.runs-on: must be a label, a list of labels or a group")
    steps = job.get("steps")
    if not isinstance(steps, list) or not steps:
        problems.append(f"{where}: missing or empty 'steps'")
        return
    ids: set[str] = set()
    for i, step in enumerate(steps):
        _check_step(step, f"{where}.steps[{i}]", ids, problems)
    for path, text in _strings(job, where):
        for body in _expressions(text, path, problems):
            for ref in re.findall(r"\bsteps\.([A-Za-z0-9_-]+)", body):
                if ref not in ids:
                    problems.append(f"{path}: refers to unknown step id {ref!r}")
            for ref in re.findall(r"\bneeds\.([A-Za-z0-9_-]+)", body):
                if ref not in job_ids:
                    problems.append(f"{path}: refers to unknown job {ref!r}")


def check_workflow(doc) -> list[str]:
    problems: list[str] = []
    if not isinstance(doc, dict):
        return ["the workflow must be a mapping"]
    # YAML 1.1 (PyYAML) reads the bare key `on` as the boolean True.
    if True in doc:
        doc = {("on" if key is True else key): value for key, value in doc.items()}
    for key in set(map(str, doc)) - TOP_KEYS:
        problems.append(f"unknown top-level key {key!r}")
    for key in ("on", "jobs"):
        if key not in doc:
            problems.append(f"missing top-level key {key!r}")
    if "on" in doc:
        _check_on(doc["on"], problems)
    if "env" in doc:
        _check_map_of_scalars(doc["env"], "env", problems)
    for path, text in _strings({k: v for k, v in doc.items() if k != "jobs"}, "workflow"):
        _expressions(text, path, problems)
    jobs = doc.get("jobs")
    if "jobs" in doc and (not isinstance(jobs, dict) or not jobs):
        problems.append("jobs: must be a non-empty mapping")
    elif isinstance(jobs, dict):
        for job_id, job in jobs.items():
            _check_job(str(job_id), job, set(map(str, jobs)), problems)
    return problems
