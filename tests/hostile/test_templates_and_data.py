"""Chat templates shipped with a model, data sets and job manifests: templates that loop or grow
without bound, values too deep to serialise, huge or broken data lines, hostile YAML."""

import json
import os
import subprocess
import time

import pytest

from conftest import (CHAT_LINES, TIME_LIMIT_S, assert_refused, run_measured, trainer_bin,
                      write_hf_model, write_jsonl)


def eval_on(model, data):
    return run_measured("eval", "--model", model, "--data", data, "--format", "chat")


# --- chat templates ------------------------------------------------------------------------------

NS = "{% set ns = namespace(s='x', v=[]) %}"


@pytest.mark.parametrize("name,template", [
    ("nested loops", "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}"),
    ("string doubling", NS + "{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}"),
    ("output doubling", NS + "{% for i in range(40) %}{{ ns.s }}{% set ns.s = ns.s ~ ns.s %}{% endfor %}"),
    ("list growth", NS + "{% for i in range(64) %}{% set ns.v = ns.v + ns.v + [i] %}{% endfor %}"),
])
def test_template_runaway_is_stopped_by_its_budget(tmp_path, bases, name, template):
    d = write_hf_model(tmp_path / "m", template=template)
    assert_refused(eval_on(d, bases.data), "chat template", "budget")


@pytest.mark.parametrize("name,template,expect", [
    ("tojson indent", "{{ messages | tojson(indent=1000000000000) }}", "indent"),
    ("deep value to json", NS + "{% for i in range(5000) %}{% set ns.v = [ns.v] %}{% endfor %}"
                                "{{ ns.v | tojson }}", "nested deeper"),
    ("syntax error", "{% for m in messages %}", "chat template"),
    ("raise_exception", "{{ raise_exception('no system role allowed') }}", "no system role allowed"),
])
def test_template_errors_are_named(tmp_path, bases, name, template, expect):
    d = write_hf_model(tmp_path / "m", template=template)
    assert_refused(eval_on(d, bases.data), "chat template", expect)


def test_template_deep_value_printed(tmp_path, bases):
    # Printing (not serialising) a deep value: minijinja's own recursion guard must hold.
    template = NS + "{% for i in range(100000) %}{% set ns.v = [ns.v] %}{% endfor %}{{ ns.v }}"
    d = write_hf_model(tmp_path / "m", template=template)
    assert_refused(eval_on(d, bases.data), "chat template")


# --- data sets -----------------------------------------------------------------------------------

def test_data_line_of_50_mb(tmp_path, bases):
    # A JSON array of 25 M zeros: parsed whole it would take gigabytes.
    path = tmp_path / "d.jsonl"
    with open(path, "w") as f:
        f.write(json.dumps(CHAT_LINES[0]) + "\n")
        f.write('{"messages": [], "pad": [' + "0," * (25 << 20) + "0]}\n")
    assert_refused(eval_on(bases.hf, path), f"{path}:2:", "limit")


def test_data_sparse_file_without_newlines(tmp_path, bases):
    path = write_jsonl(tmp_path / "d.jsonl", CHAT_LINES[:1])
    os.truncate(path, 8 << 30)   # 8 GiB of NUL bytes after line 1, no newline
    assert_refused(eval_on(bases.hf, path), f"{path}:2:", "limit")


def test_data_twenty_thousand_turns(tmp_path, bases):
    turns = []
    for i in range(10_000):
        turns += [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]
    path = write_jsonl(tmp_path / "d.jsonl", [CHAT_LINES[0], {"messages": turns}])
    assert_refused(eval_on(bases.hf, path), f"{path}:2:", "20000 messages")


def test_data_invalid_utf8_names_its_line(tmp_path, bases):
    path = write_jsonl(tmp_path / "d.jsonl", CHAT_LINES[:2])
    with open(path, "ab") as f:
        f.write(b'{"messages": [{"role": "user", "content": "caf\xe9"}]}\n')
    assert_refused(eval_on(bases.hf, path), f"{path}:3:", "UTF-8")


def test_data_deeply_nested_json(tmp_path, bases):
    path = write_jsonl(tmp_path / "d.jsonl", CHAT_LINES[:1])
    with open(path, "a") as f:
        f.write('{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    assert_refused(eval_on(bases.hf, path), f"{path}:2:", "recursion limit")


def test_data_with_a_byte_order_mark_is_read(tmp_path, bases):
    # Not an error: editors on Windows write a BOM; the first line is still JSON.
    path = write_jsonl(tmp_path / "d.jsonl", CHAT_LINES)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    ok = eval_on(bases.hf, path)
    assert ok.code == 0, ok.stderr
    assert json.loads(ok.stdout)["examples"] == len(CHAT_LINES)


# --- job manifests (the trainer's `run`) ---------------------------------------------------------

def run_job(tmp_path, text):
    job = tmp_path / "job.yaml"
    job.write_text(text)
    return job, run_measured("run", job, "--output", tmp_path / "out")


def test_manifest_deep_nesting(tmp_path):
    job, out = run_job(tmp_path, "spec: " + "[" * 100_000 + "]" * 100_000 + "\n")
    assert_refused(out, str(job))


def test_manifest_alias_bomb(tmp_path):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 12):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    job, out = run_job(tmp_path, "\n".join(lines) + "\nspec: *a11\n")
    assert_refused(out, str(job))


def test_manifest_sparse_gigabytes(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("apiVersion: finetune.dev/v1alpha1\n")
    os.truncate(job, 4 << 30)
    out = run_measured("run", job, "--output", tmp_path / "out")
    assert_refused(out, str(job))


def test_operator_check_refuses_the_same_manifests(tmp_path):
    # `finetune-operator check` shares the trainer's manifest reader: same limits, exit 2.
    operator = trainer_bin().parent / "finetune-operator"
    deep = tmp_path / "deep.yaml"
    deep.write_text("spec: " + "[" * 100_000 + "]" * 100_000 + "\n")
    huge = tmp_path / "huge.yaml"
    huge.write_text("kind: FinetuneJob\n")
    os.truncate(huge, 4 << 30)
    for path, words in ((deep, "nested deeper than 100"), (huge, "apiserver's limit")):
        start = time.monotonic()
        proc = subprocess.run([str(operator), "check", str(path)], capture_output=True, text=True,
                              timeout=20)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert time.monotonic() - start < TIME_LIMIT_S
        assert words in proc.stdout, proc.stdout
