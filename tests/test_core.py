"""CORE (eval_suite.py --tasks core, support/core.py): the batched scores equal a one-example-at-a-time reference
written here from nanochat's definition (its prompts rendered by Jinja templates, as nanochat renders them), on
bundles in the real layout; the JSON, the centered accuracies and CORE's interval; 2 ranks equal 1 process; the
download, a damaged download, and bad bundles."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from jinja2 import Template

import eval_suite as es
from bench.bench_core import write_bundle
from gpt2 import GPT, GPTConfig
from support import core
from support.checkpoints import save_checkpoint
from support.distributed import Dist
from support.tokenizer import EOT_TOKEN, get_tokenizer

REPO = Path(__file__).resolve().parents[1]

# nanochat's three prompt formats, as Jinja templates: the few-shot examples, then the example itself
TEMPLATES = {
    "multiple_choice": """{%- for ex in shots -%}
{{ ex.query }}{{ d }}{{ ex.choices[ex.gold] }}

{% endfor -%}
{{ item.query }}{{ d }}{{ option }}""",
    "schema": """{%- for ex in shots -%}
{{ ex.context_options[ex.gold] }}{{ d }}{{ ex.continuation }}

{% endfor -%}
{{ option }}{{ d }}{{ item.continuation }}""",
    "language_modeling": """{%- for ex in shots -%}
{{ ex.context | trim }}{{ d }}{{ ex.continuation }}

{% endfor -%}
{{ item.context | trim }}{{ d }}{% if option %}{{ item.continuation }}{% endif %}""",
}


def reference_prompts(task_type: str, item: dict, d: str, shots: list[dict]) -> list[str]:
    template = Template(TEMPLATES[task_type])
    render = lambda option: template.render(shots=shots, d=d, item=item, option=option)
    if task_type == "multiple_choice":
        return [render(choice) for choice in item["choices"]]
    if task_type == "schema":
        return [render(context) for context in item["context_options"]]
    return [render(False).strip(), render(True)]


def prefix_length(seqs: list[list[int]]) -> int:
    n = 0
    while all(len(s) > n for s in seqs) and len({s[n] for s in seqs}) == 1:
        n += 1
    return n


@torch.no_grad()
def reference_correct(model: GPT, path: Path, task_type: str, shots: int, d: str, max_per_task: int = 0) -> int:
    """nanochat's definition, straight-line: one example at a time, full logits, no batching across examples."""
    enc, block, vocab = get_tokenizer(), model.config.block_size, model.real_vocab_size()
    data = [json.loads(line) for line in path.read_text().splitlines()]
    random.Random(1337).shuffle(data)
    data = data[:max_per_task] if max_per_task else data
    right = 0
    for idx, item in enumerate(data):
        few = [data[i] for i in random.Random(1234 + idx).sample([i for i in range(len(data)) if i != idx], shots)] \
            if shots else []
        tokens = [[EOT_TOKEN] + enc.encode_ordinary(p) for p in reference_prompts(task_type, item, d, few)]
        if task_type == "multiple_choice":
            spans = [(prefix_length(tokens), len(t)) for t in tokens]
        elif task_type == "schema":
            suffix = prefix_length([t[::-1] for t in tokens])
            spans = [(len(t) - suffix, len(t)) for t in tokens]
        else:
            spans, tokens = [(len(tokens[0]), len(tokens[1]))], [tokens[1]]
        cropped = [(t[-block:], s - max(0, len(t) - block), e - max(0, len(t) - block))
                   for t, (s, e) in zip(tokens, spans)]
        ids = torch.full((len(cropped), max(len(t) for t, _, _ in cropped)), EOT_TOKEN)
        for r, (t, _, _) in enumerate(cropped):
            ids[r, :len(t)] = torch.tensor(t)
        logits = model(ids)[0][..., :vocab]
        losses = F.cross_entropy(logits.flatten(0, 1), torch.roll(ids, -1, 1).flatten(), reduction="none")
        losses, predicted = losses.view(ids.shape), logits.argmax(-1)
        if task_type == "language_modeling":
            _, s, e = cropped[0]
            right += bool(torch.equal(predicted[0, s - 1:e - 1], ids[0, s:e]))
        else:
            means = [losses[r, s - 1:e - 1].mean().item() for r, (_, s, e) in enumerate(cropped)]
            right += means.index(min(means)) == item["gold"]
    return right


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A bundle (7 tasks, 24 examples; every 4th context long, beyond the model's 96-token block), a random model
    of GPT-2's padded vocabulary with its checkpoint, and the reference's right answers for each task."""
    root = tmp_path_factory.mktemp("core")
    bundle = write_bundle(root / "eval_bundle", n=24, long_every=4)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=96, vocab_size=50304, n_layer=2, n_head=2, n_embd=32)).eval()
    with torch.no_grad():
        model.transformer.wte.weight.mul_(20)  # answers that differ clearly between options
    ckpt = root / "model_00000.pt"
    save_checkpoint(ckpt, {"model": model.state_dict(), "config": vars(model.config).copy(), "step": 0})
    tasks = core.load_tasks(bundle)
    want = {t.label: reference_correct(model, bundle / "eval_data" / "synthetic" / f"{t.label}.jsonl",
                                       t.task_type, t.shots, t.delimiter) for t in tasks}
    return root, bundle, model, ckpt, want


def test_batched_scores_equal_the_one_at_a_time_reference(setup, monkeypatch):
    """Rows batched across examples, and (off a GPU) an example's options sharing their prefix's one forward:
    either way, every task's right answers are the reference's."""
    root, bundle, model, _, want = setup
    tasks = core.load_tasks(bundle)
    assert {(t.task_type, t.shots) for t in tasks} >= {("multiple_choice", 0), ("multiple_choice", 10),
                                                       ("schema", 3), ("language_modeling", 10)}
    assert any(t.delimiter == "\nAnswer: " for t in tasks)  # a custom delimiter
    enc = get_tokenizer()
    longest = max(len(t) for task in tasks for i in range(len(task.data)) for t in
                  [[EOT_TOKEN] + enc.encode_ordinary(p) for p in core.prompts(task, i)])
    assert longest > model.config.block_size  # prompts the block size crops
    shared = []
    original = es.score_sharing_prefix
    monkeypatch.setattr(es, "score_sharing_prefix", lambda *a: shared.append(a[2]) or original(*a))
    for least, batch_size in ((10**9, 1), (10**9, 5), (10**9, 64), (1, 8)):  # never share, then share any prefix
        monkeypatch.setattr(es, "SHARED_PREFIX_MIN", least)
        lm = es.GPTLM(model, Dist(), batch_size, progress=False)
        assert {t.label: lm.core_correct(t) for t in tasks} == want, (least, batch_size)
        assert bool(shared) == (least == 1)
    assert sum(want.values()) > 0 and len(shared) > 24 and max(shared) > 30


def test_a_choice_that_starts_every_other_is_scored_as_nanochat(setup):
    """A choice whose tokens all lie in the options' common prefix has an empty span (no mean): nanochat's nan,
    which wins only where it comes first. The bundle has such examples, and the reference scores them too."""
    _, bundle, model, _, _ = setup
    enc, empty = get_tokenizer(), 0
    for task in core.load_tasks(bundle):
        if task.task_type == "multiple_choice":
            for i in range(len(task.data)):
                empty += any(s == len(t) for t, s in core.rows(task, i, enc.encode_ordinary, 96))
    assert empty >= 3
    task = core.Task("t", "multiple_choice", 0, " ", 0.25, [{"gold": 0}, {"gold": 1}])
    assert core.is_correct(task, 0, [(0.0, 0, False), (-1.0, 2, False), (-9.0, 3, False)])  # nan first: chosen
    assert not core.is_correct(task, 1, [(-1.0, 2, False), (0.0, 0, False)])  # elsewhere: never chosen
    assert core.is_correct(task, 1, [(-4.0, 2, False), (0.0, 0, False), (-1.0, 2, False)]) is False
    assert core.is_correct(core.Task("t", "multiple_choice", 0, " ", 0.25, [{"gold": 2}]), 0,
                           [(-4.0, 2, False), (0.0, 0, False), (-1.0, 2, False)])


def test_prompts_render_as_nanochats_templates(setup):
    _, bundle, _, _, _ = setup
    for task in core.load_tasks(bundle):
        for i in range(len(task.data)):
            shots = core.fewshot(task.data, i, task.shots)
            assert core.prompts(task, i) == reference_prompts(task.task_type, task.data[i], task.delimiter, shots)


def test_max_per_task_keeps_the_first_after_the_shuffle(setup):
    _, bundle, model, _, _ = setup
    lm = es.GPTLM(model, Dist(), 8, progress=False)
    for task in core.load_tasks(bundle, max_per_task=12):
        assert len(task.data) == 12
        path = bundle / "eval_data" / "synthetic" / f"{task.label}.jsonl"
        assert lm.core_correct(task) == reference_correct(model, path, task.task_type, task.shots, task.delimiter, 12)
    with pytest.raises(core.CoreError, match="draws 10 few-shot examples from the others, but has 10 examples"):
        core.load_tasks(bundle, max_per_task=10)


def test_the_command_writes_nanochats_keys_and_the_interval(setup, tmp_path, capsys):
    root, bundle, _, ckpt, want = setup
    out = tmp_path / "core.json"
    assert es.main(["-m", str(ckpt), "--tasks", "core", "--core-bundle", str(bundle), "--output", str(out),
                    "--device", "cpu"]) == 0
    res = json.loads(out.read_text())
    tasks = {t.label: t for t in core.load_tasks(bundle)}
    for label, task in tasks.items():
        n, b, p = len(task.data), task.baseline, want[label] / len(task.data)
        assert res["results"][label] == p and res["stderr"][label] == pytest.approx(math.sqrt(p * (1 - p) / n))
        assert res["centered_results"][label] == pytest.approx((p - b) / (1 - b))
        assert res["centered_stderr"][label] == pytest.approx(res["stderr"][label] / (1 - b))
    core_metric = sum(res["centered_results"].values()) / len(tasks)
    se = math.sqrt(sum(s * s for s in res["centered_stderr"].values())) / len(tasks)
    assert res["core_metric"] == pytest.approx(core_metric) and res["core_stderr"] == pytest.approx(se)
    assert res["core_interval_95"] == pytest.approx([core_metric - 1.96 * se, core_metric + 1.96 * se])
    text = capsys.readouterr().out
    assert f"CORE {core_metric:.4f} (95% interval" in text and "gpt2 (124M) 0.1139" in text
    assert "mc_tenshot       | 10    | multiple_choice   | 24 |" in text


def test_two_ranks_equal_one_process(setup, tmp_path):
    root, bundle, _, ckpt, _ = setup
    outs = {}
    for nproc in (1, 2):
        outs[nproc] = tmp_path / f"core{nproc}.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "eval_suite.py", "-m", str(ckpt), "--tasks", "core", "--core-bundle", str(bundle), "--output",
               str(outs[nproc]), "--device", "cpu"]
        out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert out.returncode == 0, out.stderr[-3000:]
    one, two = (json.loads(outs[n].read_text()) for n in (1, 2))
    assert two["config"]["world_size"] == 2
    for key in ("results", "centered_results", "core_metric", "stderr"):
        assert two[key] == one[key], key


def zip_bundle(bundle: Path, path: Path) -> Path:
    """The bundle as eval_bundle.zip holds it: one folder eval_bundle/ inside."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for f in sorted(bundle.rglob("*")):
            z.write(f, Path("eval_bundle") / f.relative_to(bundle))
    return path


def test_the_bundle_is_downloaded_once_and_a_damaged_download_is_named_and_redone(setup, tmp_path, monkeypatch):
    _, bundle, _, ckpt, want = setup
    good = zip_bundle(bundle, tmp_path / "good.zip")
    bad = tmp_path / "bad.zip"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    cache = tmp_path / "cache" / "eval_bundle"
    args = ["-m", str(ckpt), "--tasks", "core", "--core-cache", str(cache), "--output", str(tmp_path / "o.json"),
            "--device", "cpu", "--max-per-task", "12"]
    monkeypatch.setenv("CORE_BUNDLE_URL", bad.as_uri())
    assert es.main(args) == 2
    assert not cache.exists() and list(cache.parent.iterdir()) == []  # nothing half-made, the zip deleted
    corrupt = tmp_path / "corrupt.zip"  # whole, but a member's compressed bytes damaged: zlib's error, named too
    data = bytearray(good.read_bytes())
    member = max(zipfile.ZipFile(good).infolist(), key=lambda m: m.compress_size)
    middle = member.header_offset + 30 + len(member.filename) + member.compress_size // 2
    data[middle:middle + 64] = bytes(64)
    corrupt.write_bytes(bytes(data))
    monkeypatch.setenv("CORE_BUNDLE_URL", corrupt.as_uri())
    assert es.main(args) == 2
    assert not cache.exists() and list(cache.parent.iterdir()) == []
    cache.mkdir()  # an empty folder where the bundle goes (made by hand) is no bundle: downloaded into
    monkeypatch.setenv("CORE_BUNDLE_URL", good.as_uri())
    assert es.main(args) == 0 and (cache / "core.yaml").is_file()
    monkeypatch.setenv("CORE_BUNDLE_URL", "http://127.0.0.1:9/eval_bundle.zip")  # unreachable: not used again
    assert es.main(args) == 0


def one_line_error(args: list[str], capsys) -> str:
    assert es.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("eval_suite.py: error: "), err
    return err[0]


def test_bad_bundles_are_one_line_errors(setup, tmp_path, capsys, monkeypatch):
    _, bundle, _, ckpt, _ = setup
    run = lambda folder: one_line_error(["-m", str(ckpt), "--tasks", "core", "--core-bundle", str(folder),
                                         "--device", "cpu", "--output", str(tmp_path / "o.json")], capsys)
    assert "no core.yaml there" in run(tmp_path / "missing")
    monkeypatch.setenv("CORE_BUNDLE_URL", "http://127.0.0.1:9/eval_bundle.zip")
    offline = one_line_error(["-m", str(ckpt), "--tasks", "core", "--core-cache", str(tmp_path / "none"),
                              "--device", "cpu"], capsys)
    assert "could not download CORE's eval bundle" in offline and "--core-bundle DIR" in offline
    broken = lambda name: shutil.copytree(bundle, tmp_path / name)
    f = broken("not_json") / "eval_data" / "synthetic" / "lm_zeroshot.jsonl"
    f.write_text(f.read_text() + "{not json\n")
    assert "lm_zeroshot.jsonl line 25 is not JSON" in run(f.parents[2])
    folder = broken("unknown_type")
    (folder / "core.yaml").write_text((folder / "core.yaml").read_text().replace("icl_task_type: schema",
                                                                                   "icl_task_type: generation", 1))
    assert "has icl_task_type 'generation'" in run(folder)
    folder = broken("no_baseline")
    meta = folder / "eval_meta_data.csv"
    meta.write_text("\n".join(line for line in meta.read_text().splitlines() if not line.startswith("lm_tenshot")))
    assert "no 'Random baseline' for task lm_tenshot" in run(folder)
    f = broken("no_field") / "eval_data" / "synthetic" / "schema_zeroshot.jsonl"
    f.write_text(f.read_text() + '{"context_options": ["a", "b"], "gold": 0}\n')
    assert "schema_zeroshot.jsonl line 25 has no continuation" in run(f.parents[2])
