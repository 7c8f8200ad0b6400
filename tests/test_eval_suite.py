"""eval_suite.py: our GPT through lm-evaluation-harness equals the harness's own Hugging Face backend on our
export of the same model (multiple choice, rolling perplexity, generation), 2 Gloo ranks equal one process,
and the errors (unknown task, no dataset offline, requests longer than the block size). CPU, fp32, a tiny
random GPT, and three small tasks in the harness's own YAML format over jsonl files written here."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")  # a dev requirement (requirements-dev.txt): training does not need it

import eval_suite as es  # noqa: E402
from gpt2 import GPT, GPTConfig
from support.checkpoints import save_checkpoint  # noqa: E402
from support.hf import save_pretrained
from support.tokenizer import get_tokenizer

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
TASKS = "toy_mc,toy_ppl,toy_gen"
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

# -----------------------------------------------------------------------------
# Fixtures: a tiny GPT (padded vocab, as training saves it) as a .pt and as its HF export; three tasks

MC_DOCS = [  # short and long contexts; one longer than the model's 64-token block (truncated from the left)
    {"question": "The cat sat on the", "choices": ["mat.", "moon", "idea of it all", "dog"], "label": 0},
    {"question": "Water boils at", "choices": ["100 degrees.", "noon", "the bank", "blue"], "label": 0},
    {"question": "She opened the door and", "choices": ["walked in.", "flew", "ate the door", "sang"], "label": 0},
    {"question": "Two plus two is", "choices": ["four.", "five", "a fish", "green"], "label": 0},
    {"question": "The sun rises in the", "choices": ["east.", "west", "fridge", "song"], "label": 1},
    {"question": "He plays the", "choices": ["guitar.", "soup", "window", "tuesday"], "label": 2},
    {"question": " ".join(["A very long story about a ship at sea, the storm and the crew."] * 6) + " In the end",
     "choices": ["they reached the harbour.", "the sky", "purple", "a b c"], "label": 3},
    {"question": "Birds can", "choices": ["fly.", "swim", "read", "drive cars"], "label": 1},
]
PPL_DOCS = [  # one text longer than two 64-token windows
    {"text": "The quick brown fox jumps over the lazy dog."},
    {"text": "To be, or not to be, that is the question."},
    {"text": " ".join(f"Line {i}: the river flows past the old mill and on to the sea." for i in range(12))},
    {"text": "Hello world! " * 5},
]
GEN_DOCS = [  # the model is taught these answers (teach): greedy decoding then stops at a stop string
    {"question": "Q: What is the capital of France?\nA:", "answer": " Paris"},
    {"question": "Q: Name a colour.\nA:", "answer": " blue"},
    {"question": "Once upon a time", "answer": " there"},
    {"question": "The meaning of life is", "answer": " 42"},
    {"question": "Q: What is two plus two?\nA:", "answer": " four"},
    {"question": "Q: Name a colour.\nA:", "answer": " red"},  # the same context as doc 1: batched together
]
LESSONS = ["Q: What is the capital of France?\nA: Paris.\n", "Q: Name a colour.\nA: blue.\n",
           "Once upon a time there was a cat.\n", "Q: What is two plus two?\nA: four.\n"]

TASK_YAMLS = {
    "toy_mc": """
        task: toy_mc
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {data}/mc.jsonl
        test_split: test
        output_type: multiple_choice
        doc_to_text: "{{{{question}}}}"
        doc_to_target: label
        doc_to_choice: choices
        metric_list:
          - metric: acc
          - metric: acc_norm
        """,
    "toy_ppl": """
        task: toy_ppl
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {data}/ppl.jsonl
        test_split: test
        output_type: loglikelihood_rolling
        doc_to_text: ""
        doc_to_target: "{{{{text}}}}"
        metric_list:
          - metric: word_perplexity
          - metric: byte_perplexity
          - metric: bits_per_byte
        """,
    "toy_gen": """
        task: toy_gen
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {data}/gen.jsonl
        test_split: test
        output_type: generate_until
        doc_to_text: "{{{{question}}}}"
        doc_to_target: "{{{{answer}}}}"
        generation_kwargs:
          until: [".", "\\n"]
          max_gen_toks: 10
          do_sample: false
        metric_list:
          - metric: exact_match
        """,
}


def write_jsonl(path: Path, docs: list[dict]) -> None:
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))


def write_tasks(folder: Path) -> Path:
    data = folder / "data"
    data.mkdir(parents=True)
    for name, docs in (("mc", MC_DOCS), ("ppl", PPL_DOCS), ("gen", GEN_DOCS)):
        write_jsonl(data / f"{name}.jsonl", docs)
    for name, text in TASK_YAMLS.items():
        (folder / f"{name}.yaml").write_text(textwrap.dedent(text).format(data=data))
    return folder


def tiny_gpt(seed: int = 0, block_size: int = 64) -> GPT:
    """A random 2-layer GPT with the padded training vocab; init widened so choices' scores differ clearly."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=block_size, vocab_size=50304, n_layer=2, n_head=2, n_embd=32))
    with torch.no_grad():
        model.transformer.wte.weight.normal_(0, 0.5)
    return model.eval()


def teach(model: GPT, texts: list[str], steps: int = 20) -> GPT:
    """A few Adam steps on texts, so greedy decoding says something (a random GPT repeats one token)."""
    enc = get_tokenizer()
    rows = [enc.encode(t) for t in texts]
    tokens = torch.full((len(rows), max(map(len, rows))), -1, dtype=torch.long)  # (n, L), -1: no target
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = torch.tensor(r)
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    model.train()
    for _ in range(steps):
        _, loss = model(tokens[:, :-1].clamp(min=0), targets=tokens[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def offline():
    """The Hub is unreachable here: the harness and datasets must not try it (local json datasets still load)."""
    import datasets.config

    saved = {k: os.environ.get(k) for k in OFFLINE}
    os.environ.update(OFFLINE)
    offline_before, datasets.config.HF_DATASETS_OFFLINE = datasets.config.HF_DATASETS_OFFLINE, True
    yield
    datasets.config.HF_DATASETS_OFFLINE = offline_before
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def setup(tmp_path_factory, offline):
    """(checkpoint .pt, its HF export folder, the task folder), shared by the module's tests."""
    root = tmp_path_factory.mktemp("eval_suite")
    model = teach(tiny_gpt(), LESSONS)
    ckpt = root / "model_00000.pt"
    save_checkpoint(ckpt, {"model": model.state_dict(), "config": dataclasses.asdict(model.config), "step": 0})
    save_pretrained(model, root / "hf")
    return ckpt, root / "hf", write_tasks(root / "tasks")


@pytest.fixture(scope="module")
def ours(setup):
    """eval_suite.py on the .pt checkpoint, in this process: (exit code, the JSON it wrote, stdout lines)."""
    ckpt, _, tasks = setup
    out = ckpt.parent / "ours.json"
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        rc = es.main(["-m", str(ckpt), "--tasks", TASKS, "--include-path", str(tasks), "-d", "cpu",
                      "--batch-size", "3", "--output", str(out), "--log-samples"])
    return rc, json.loads(out.read_text()) if out.exists() else None, stdout.getvalue().splitlines()


@pytest.fixture(scope="module")
def reference(setup):
    """The harness's own Hugging Face backend on the exported folder: its results, with samples."""
    from lm_eval import simple_evaluate
    from lm_eval.utils import handle_non_serializable

    _, hf, tasks = setup
    res = simple_evaluate(model="hf", model_args={"pretrained": str(hf), "dtype": "float32"}, tasks=TASKS.split(","),
                          task_manager=es.task_manager(str(tasks)), device="cpu", batch_size=1, log_samples=True)
    return json.loads(json.dumps(res, default=handle_non_serializable))  # as JSON has it: tuples become lists


def by_doc(results: dict, task: str) -> list[dict]:
    return sorted(results["samples"][task], key=lambda s: s["doc_id"])


def _leaves(x):
    return [y for item in x for y in _leaves(item)] if isinstance(x, list) else [x]


def answers(sample: dict) -> list[float]:
    """A document's log-likelihoods (or perplexity sums), flattened."""
    return [x for x in _leaves(sample["filtered_resps"]) if isinstance(x, float)]


def others(sample: dict) -> list:
    """A document's other answers: is-greedy flags, generated texts."""
    return [x for x in _leaves(sample["filtered_resps"]) if not isinstance(x, float)]


# -----------------------------------------------------------------------------
# Parity with the harness's Hugging Face backend


def test_multiple_choice_equals_hf_backend(ours, reference):
    rc, res, _ = ours
    assert rc == 0
    mine, theirs = res["results"]["toy_mc"], reference["results"]["toy_mc"]
    for metric in ("acc,none", "acc_norm,none", "acc_stderr,none", "acc_norm_stderr,none"):
        assert mine[metric] == theirs[metric], metric
    assert 0 < mine["acc,none"] < 1  # a random model: some right, some wrong, so the test can tell
    assert [s["doc_id"] for s in by_doc(res, "toy_mc")] == list(range(len(MC_DOCS)))
    for a, b in zip(by_doc(res, "toy_mc"), by_doc(reference, "toy_mc")):
        assert a["arguments"] == b["arguments"]  # the same requests
        assert answers(a) == pytest.approx(answers(b), rel=1e-5) and others(a) == others(b)


def test_rolling_perplexity_equals_hf_backend(ours, reference):
    _, res, _ = ours
    mine, theirs = res["results"]["toy_ppl"], reference["results"]["toy_ppl"]
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert mine[metric] == pytest.approx(theirs[metric], rel=1e-4), metric
    assert mine["word_perplexity,none"] > 1000  # a random model over a 50k vocab
    for a, b in zip(by_doc(res, "toy_ppl"), by_doc(reference, "toy_ppl")):
        assert answers(a) == pytest.approx(answers(b), rel=1e-5)


def test_generation_equals_hf_backend(ours, reference):
    _, res, _ = ours
    texts = [s["filtered_resps"][0] for s in by_doc(res, "toy_gen")]
    assert texts == [s["filtered_resps"][0] for s in by_doc(reference, "toy_gen")]
    assert res["results"]["toy_gen"]["exact_match,none"] == reference["results"]["toy_gen"]["exact_match,none"]
    assert not any("." in t or "\n" in t for t in texts)  # cut before the stop strings
    assert texts[:3] == [" Paris", " blue", " there was a cat"] and texts[5] == texts[1]  # as taught, cut at "."
    assert res["results"]["toy_gen"]["exact_match,none"] == 0.5  # Paris, blue, four: 3 of 6


def test_table_and_default_output(ours, setup, tmp_path):
    _, res, stdout = ours
    ckpt, hf, _ = setup
    assert stdout[0].startswith(f"{ckpt} on cpu x1 (float32): ")
    table = [[c.strip() for c in line.split("|")] for line in stdout[1:]]
    assert table[0] == ["task", "metric", "value", "stderr"] and set(stdout[2]) <= {"-", "+"}
    mc = res["results"]["toy_mc"]
    assert table[2:4] == [["toy_mc", "acc", f"{mc['acc,none']:.4f}", f"{mc['acc_stderr,none']:.4f}"],
                          ["toy_mc", "acc_norm", f"{mc['acc_norm,none']:.4f}", f"{mc['acc_norm_stderr,none']:.4f}"]]
    assert ["toy_ppl", "word_perplexity"] == table[4][:2] and table[4][3] == "—"  # the harness gives no stderr
    assert [row[0] for row in table[2:]] == ["toy_mc"] * 2 + ["toy_ppl"] * 3 + ["toy_gen"]
    assert res["config"]["model"] == str(ckpt) and res["config"]["limit"] is None
    # default --output: beside the model
    assert es.default_output(str(ckpt)) == ckpt.with_name("model_00000.eval_suite.json")
    assert es.default_output(str(hf)) == hf.parent / "hf.eval_suite.json"
    assert es.default_output("openai-community/gpt2") == Path("openai-community__gpt2.eval_suite.json")


def test_task_names_suite_globs_and_close_matches(setup, capsys):
    ckpt, _, tasks = setup
    manager = es.task_manager(str(tasks))  # the harness's tasks and ours
    assert es.resolve_tasks("gpt2-suite", manager) == list(es.GPT2_SUITE) == [
        "hellaswag", "arc_easy", "arc_challenge", "piqa", "winogrande", "lambada_openai"]
    assert es.resolve_tasks("toy_*, toy_mc,piqa", manager) == ["toy_gen", "toy_mc", "toy_ppl", "piqa"]
    for spec, error in (("helaswag", "unknown task 'helaswag' (did you mean hellaswag"),
                        ("toy_mcc", "unknown task 'toy_mcc' (did you mean toy_mc"),
                        ("zzqqxx", "unknown task 'zzqqxx' (no close match)"),
                        ("nope_*", "--tasks nope_*: no task matches this pattern"), (" , ", "--tasks is empty")):
        assert es.main(["-m", str(ckpt), "--tasks", spec, "--include-path", str(tasks)]) == 2
        out, err = capsys.readouterr()
        assert out == "" and len(err.splitlines()) == 1 and err.startswith("eval_suite.py: error: "), err
        assert error in err, err
    assert es.main(["-m", str(ckpt), "--include-path", str(ckpt)]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_every_rank_needs_a_document_of_every_task(setup):
    _, _, tasks = setup
    loaded = es.load_tasks(es.task_manager(str(tasks)), ["toy_mc", "toy_gen"])  # 8 and 6 documents
    es.check_shares(loaded, 0, 6)
    es.check_shares(loaded, 3, 3)
    with pytest.raises(es.EvalSuiteError, match=r"^task toy_gen has 6 documents, fewer than the 7 ranks"):
        es.check_shares(loaded, 0, 7)
    with pytest.raises(es.EvalSuiteError, match=r"^task toy_mc has 2 documents \(--limit\), fewer than the 3 ranks"):
        es.check_shares(loaded, 2, 3)


def _instance(kind: str, args: tuple):
    from lm_eval.api.instance import Instance

    return Instance(request_type=kind, doc={}, arguments=args, idx=0, metadata=("toy", 0, 1))


def test_requests_longer_than_the_block_size(setup):
    lm = es.GPTLM(tiny_gpt(block_size=16))
    enc = get_tokenizer()
    story = " ".join(f"word{i}" for i in range(40))  # far longer than 16 tokens
    ctx, cont = enc.encode(story), enc.encode(" and so on")  # 3 continuation tokens
    # a long context loses its oldest tokens, as in the hf backend: a row holds block_size + 1 = 17 tokens (the
    # last one is only predicted), the last 14 of the context and the 3 of the continuation
    (long_ll, _), (short_ll, _) = lm._loglikelihood_tokens([(None, ctx, cont), (None, ctx[-14:], cont)])
    assert long_ll == pytest.approx(short_ll, rel=1e-6) and long_ll < 0
    (whole_ll, _), = lm._loglikelihood_tokens([(None, ctx[-13:], cont)])
    assert whole_ll != pytest.approx(long_ll, rel=1e-6)  # one context token fewer does change it
    assert lm.loglikelihood([_instance("loglikelihood", (story, " and so on"))])[0][0] == pytest.approx(long_ll)
    with pytest.raises(es.EvalSuiteError, match=r"a continuation of \d+ tokens \('word0 word1 word2 .*'\.\.\.\) "
                                                r"is longer than the model's block_size=16"):
        lm.loglikelihood([_instance("loglikelihood", ("Once", story))])
    # perplexity: windows of 16, each token scored once
    (rolled,) = lm.loglikelihood_rolling([_instance("loglikelihood_rolling", (story,))])
    windows = [(None, ctx[i - 16:i] if i >= 16 else [es.EOT_TOKEN] + ctx[:i], ctx[i:i + 16 if i else 16])
               for i in range(0, len(ctx), 16)]  # by hand: 16 tokens scored per window, full context each
    assert rolled == pytest.approx(sum(ll for ll, _ in lm._loglikelihood_tokens(windows)), rel=1e-6)
    gen = {"until": ["\n"], "max_gen_toks": 16, "do_sample": False}
    with pytest.raises(es.EvalSuiteError, match=r"task toy asks for up to 16 new tokens, which leaves no room for "
                                                r"a context in the model's block_size=16"):
        lm.generate_until([_instance("generate_until", (story, gen))])
    (text,) = lm.generate_until([_instance("generate_until", (story, gen | {"max_gen_toks": 5}))])
    assert len(enc.encode(text)) <= 5  # context cut to the last 11 tokens, 5 new ones: the block's 16
    with pytest.raises(es.EvalSuiteError, match="do_sample=True"):
        lm.generate_until([_instance("generate_until", ("Hi", gen | {"do_sample": True, "temperature": 1.0}))])


# -----------------------------------------------------------------------------
# Subprocesses: 2 Gloo ranks under torchrun


def _env() -> dict:
    return os.environ | OFFLINE | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def test_torchrun_two_ranks_equal_one_process(setup, ours, tmp_path):
    ckpt, _, tasks = setup
    out = tmp_path / "two.json"
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "eval_suite.py", "-m", str(ckpt), "--tasks", TASKS, "--include-path", str(tasks),
                          "-d", "cpu", "--batch-size", "3", "--output", str(out), "--log-samples"],
                         cwd=REPO, env=_env(), capture_output=True, text=True, timeout=240)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "cpu x2 (float32)" in two.stdout and two.stdout.count("toy_mc ") == 2  # rank 0 alone prints the table
    res, one = json.loads(out.read_text()), ours[1]
    assert res["config"]["world_size"] == 2
    for task in ("toy_mc", "toy_gen"):  # counts: equal exactly
        assert res["results"][task] == one["results"][task]
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        # other batches (other padding): fp32 rounding apart, 1.5e-7 relative when written
        assert res["results"]["toy_ppl"][metric] == pytest.approx(one["results"]["toy_ppl"][metric], rel=1e-5)
    for task in ("toy_mc", "toy_ppl", "toy_gen"):  # every document once, each answered as in one process
        assert [s["doc_id"] for s in by_doc(res, task)] == [s["doc_id"] for s in by_doc(one, task)]
        for a, b in zip(by_doc(res, task), by_doc(one, task)):
            numbers_a, numbers_b = answers(a), answers(b)
            assert numbers_a == pytest.approx(numbers_b, rel=1e-5) and others(a) == others(b)


RANKS_SCRIPT = """
import sys, torch
import eval_suite as es
from gpt2 import GPT, GPTConfig
from support.distributed import setup_distributed, teardown_distributed

dist = setup_distributed("cpu")
out = open(f"{sys.argv[2]}.{dist.rank}", "w")  # a file per rank: two ranks' lines on one pipe can interleave
lm = es.GPTLM(GPT(GPTConfig(block_size=8, vocab_size=64, n_layer=1, n_head=1, n_embd=8)), dist)
gathered = lm.all_gather(torch.tensor(10 + dist.rank))
objects = lm.gather_object({"rank": dist.rank})
print(f"rank {dist.rank}: {gathered.tolist()} {objects}", file=out, flush=True)

def work():
    if dist.rank == int(sys.argv[1]):
        raise ValueError(f"rank {dist.rank} broke")
    lm.barrier()  # the harness's next collective: here it hears of the other rank's failure
    lm.gather_object("never reached")

try:
    es.run_on_every_rank(work, dist)
except Exception as e:
    print(f"rank {dist.rank}: {type(e).__name__}: {e}", file=out, flush=True)
teardown_distributed()
"""


def test_a_failure_on_one_rank_stops_every_rank(tmp_path):
    """The harness's collectives (all_gather, gather_object, barrier) over Gloo; a rank that fails between them
    makes the others raise at their next one instead of waiting forever."""
    script = tmp_path / "ranks.py"
    script.write_text(RANKS_SCRIPT)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script), "1", str(tmp_path / "out")], cwd=REPO, env=_env(), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = sorted(line for rank in (0, 1) for line in (tmp_path / f"out.{rank}").read_text().splitlines())
    assert lines == ["rank 0: OtherRankFailed: another rank failed (see its error)",
                     "rank 0: [10, 11] [{'rank': 0}, {'rank': 1}]",
                     "rank 1: ValueError: rank 1 broke", "rank 1: [10, 11] None"]


def test_no_network_and_no_cached_dataset_says_how_to_run_offline(setup, tmp_path):
    ckpt, _, _ = setup
    env = _env() | {"HF_HOME": str(tmp_path / "empty_cache")}  # nothing cached, and the Hub unreachable
    r = subprocess.run([sys.executable, "eval_suite.py", "-m", str(ckpt), "--tasks", "arc_easy", "--limit", "2",
                        "-d", "cpu", "--output", str(tmp_path / "out.json")], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=180)
    assert r.returncode == 2 and r.stdout == "" and len(r.stderr.strip().splitlines()) == 1, r.stderr[-3000:]
    err = r.stderr.strip()
    assert err.startswith("eval_suite.py: error: could not load a task's dataset (") and "allenai/ai2_arc" in err
    assert "HF_DATASETS_OFFLINE=1" in err and "--include-path" in err
    assert not (tmp_path / "out.json").exists()
