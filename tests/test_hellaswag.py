"""hellaswag.py: rendering, batched == one-at-a-time scoring, data loading and its errors, the CLI
on an HF folder and on our checkpoints, and a 2-process Gloo run. CPU, fp32, tiny random models."""

from __future__ import annotations

import dataclasses
import http.server
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import hellaswag as hs
from gpt2 import GPT, GPTConfig
from support.checkpoints import save_checkpoint
from support.distributed import Dist
from support.hf import from_pretrained
from support.tokenizer import get_tokenizer

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

# -----------------------------------------------------------------------------
# Fixtures: invented examples in the real hellaswag_val.jsonl schema, short and long contexts and endings


def _example(ind, label, ctx_a, ctx_b, endings, source="activitynet", split_type="indomain"):
    ctx = f"{ctx_a} {ctx_b}" if ctx_b else ctx_a
    return {"ind": ind, "activity_label": "Invented", "ctx_a": ctx_a, "ctx_b": ctx_b, "ctx": ctx, "split": "val",
            "split_type": split_type, "label": label, "endings": endings, "source_id": f"{source}~{ind}"}


EXAMPLES = [
    _example(1, 1, "A cat sits on a mat.", "the cat",
             ["jumps off.", "falls asleep on the mat.", "eats.", "looks at the camera and meows loudly."]),
    _example(2, 0, "A man stands at a grill in a backyard. He flips several burgers with a spatula.", "he",
             ["puts the burgers on buns and hands them to the kids.", "swims.", "is shown playing a guitar.",
              "drives away in a red car while the burgers burn on the grill behind him."]),
    _example(3, 3, "Two girls are on a beach.", "they",
             ["sing.", "build a small castle out of wet sand near the water.", "fly.", "dig a hole."]),
    _example(4, 2, "How to clean a cast iron pan. Let the pan cool down. Rinse it with hot water and scrub "
             "gently with a brush, avoiding soap if you can because it strips the seasoning.", "",
             ["Put the pan in the dishwasher on the hottest cycle.", "Paint it.",
              "Dry it completely with a towel and heat it on the stove for a minute, then rub a thin layer "
              "of oil over the surface.", "Throw the pan away and buy a new one."],
             source="wikihow", split_type="zeroshot"),
    _example(5, 1, "A woman is shown kneeling in a garden.", "she",
             ["rides a horse across the field.", "pulls weeds out of the soil and puts them in a bucket.",
              "talks.", "is then shown on a skateboard doing tricks in a parking lot."]),
    _example(6, 0, "How to tie a tie. Drape the tie around your neck with the wide end on your right.", "",
             ["Cross the wide end over the narrow end and bring it up through the loop.", "Cut it.",
              "Wear two ties.", "Hang the tie in the closet until next week."], source="wikihow"),
    _example(7, 2, "A boy runs down a track toward a bar. He plants his pole.", "the boy",
             ["falls.", "waves to the crowd.", "vaults over the bar and lands on the mat.", "eats lunch."],
             split_type="zeroshot"),
    _example(8, 3, "A dog is in a yard with a frisbee.", "a man",
             ["sleeps.", "reads a book on the porch.", "paints the fence blue.",
              "throws the frisbee and the dog catches it in the air."]),
    _example(9, 1, "How to plant tomatoes. Choose a sunny spot. Dig a hole deeper than the root ball, "
             "because tomatoes grow roots along their buried stems.", "",
             ["Water the leaves at noon every day.", "Set the plant in the hole and fill it with soil.",
              "Plant the seeds in the freezer.", "Wait."], source="wikihow"),
    _example(10, 0, "People are skating on a frozen lake.", "a girl",
             ["spins in a circle on one skate.", "swims under the ice.", "cooks.", "falls through the roof."]),
    _example(11, 2, "A man is holding an accordion on a stage.", "he",
             ["eats the accordion.", "leaves.", "begins to play a song while people clap.", "sleeps."]),
    _example(12, 1, "How to make tea. Boil water in a kettle.", "",
             ["Pour the water on the floor.", "Put a tea bag in a cup and pour the hot water over it.",
              "Drink the kettle.", "Freeze the water into ice cubes and throw them away."], source="wikihow"),
]


def write_jsonl(path: Path, examples=EXAMPLES, lines=None) -> Path:
    lines = lines if lines is not None else [json.dumps(ex) for ex in examples]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def data_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "hellaswag_val.jsonl")


def tiny_gpt(seed=0, block_size=128) -> GPT:
    """A random 2-layer GPT with the padded training vocab; init widened so endings' losses differ clearly."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=block_size, vocab_size=50304, n_layer=2, n_head=2, n_embd=32))
    with torch.no_grad():
        model.transformer.wte.weight.normal_(0, 0.5)
    return model.eval()


def checkpoint(model: GPT, path: Path) -> Path:
    save_checkpoint(path, {"model": model.state_dict(), "config": dataclasses.asdict(model.config), "step": 0})
    return path


def run_cli(argv: list[str], capsys) -> tuple[int, list[str], list[str]]:
    rc = hs.main(argv)
    out, err = capsys.readouterr()
    return rc, out.strip().splitlines(), [line for line in err.splitlines() if line.strip()]


TOTALS_RE = re.compile(r"num_total (\d+) \| num_correct (\d+) \| num_correct_norm (\d+)")
LAST_RE = re.compile(r"^hellaswag val: (\d+) examples \| acc (\d\.\d{4}) \| acc_norm (\d\.\d{4})$")


def totals(stdout_lines: list[str]) -> tuple[int, int, int]:
    """(num_total, num_correct, num_correct_norm) from the CLI's output; checks the last line's format."""
    found = [m.groups() for line in stdout_lines if (m := TOTALS_RE.search(line))]
    assert len(found) == 1, stdout_lines  # printed once, by rank 0 only
    n, c, cn = map(int, found[0])
    last = LAST_RE.match(stdout_lines[-1])
    assert last, stdout_lines[-1]
    assert int(last.group(1)) == n and last.group(2) == f"{c / n:.4f}" and last.group(3) == f"{cn / n:.4f}"
    return n, c, cn


# -----------------------------------------------------------------------------
# Rendering and scoring


def test_render_example_tokens_and_mask():
    tokens, mask, label = hs.render_example(EXAMPLES[0])
    ctx = [32, 3797, 10718, 319, 257, 2603, 13, 262, 3797]  # "A cat sits on a mat. the cat"
    ends = [[18045, 572, 13],  # " jumps off."
            [8953, 16039, 319, 262, 2603, 13],  # " falls asleep on the mat."
            [25365, 13],  # " eats."
            [3073, 379, 262, 4676, 290, 502, 1666, 23112, 13]]  # " looks at the camera and meows loudly."
    enc = get_tokenizer()
    assert enc.encode(EXAMPLES[0]["ctx"]) == ctx and [enc.encode(" " + e) for e in EXAMPLES[0]["endings"]] == ends
    assert label == 1 and tokens.dtype == mask.dtype == torch.long and tokens.shape == mask.shape == (4, 18)
    for i, end in enumerate(ends):
        pad = 18 - len(ctx) - len(end)
        assert tokens[i].tolist() == ctx + end + [0] * pad
        assert mask[i].tolist() == [0] * len(ctx) + [1] * len(end) + [0] * pad


def test_row_losses_is_the_reference_formula():
    torch.manual_seed(0)
    tokens, mask, _ = hs.render_example(EXAMPLES[1])
    logits = torch.randn(*tokens.shape, 50304) * 3
    # the reference, spelled out: per-token CE of every shifted position, masked, summed, divided
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, 50304), tokens[:, 1:].reshape(-1), reduction="none")
    ce = ce.view(4, -1) * mask[:, 1:]
    ref_sum, ref_avg = ce.sum(1), ce.sum(1) / mask[:, 1:].sum(1)
    s, a = hs.row_losses(logits, tokens, mask)
    torch.testing.assert_close(s, ref_sum)
    torch.testing.assert_close(a, ref_avg)
    # the scored-positions-only form (what the batched path feeds it) gives the same numbers
    picked = logits[:, :-1][mask[:, 1:].bool()]
    s2, a2 = hs.row_losses(picked, tokens, mask)
    torch.testing.assert_close(s2, s)
    torch.testing.assert_close(a2, a)


@pytest.fixture(scope="module")
def reference():
    """The tiny model and its one-example-at-a-time losses and results, computed once."""
    model = tiny_gpt()
    sum_u, avg_u = hs.score_unbatched(model, EXAMPLES, "cpu")
    return model, (sum_u, avg_u), hs.results(hs._counts(sum_u, avg_u, EXAMPLES))


@pytest.mark.parametrize("batch_size", [1, 3, 5, 64])
def test_batched_equals_unbatched(reference, batch_size):
    model, (sum_u, avg_u), res_u = reference
    shapes = []
    hook = model.register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape)))
    try:
        sum_b, avg_b = hs.score_batched(model, EXAMPLES, "cpu", batch_size)
    finally:
        hook.remove()
    assert sum_b.shape == avg_b.shape == (12, 4)
    assert torch.equal(sum_b.argmin(1), sum_u.argmin(1)) and torch.equal(avg_b.argmin(1), avg_u.argmin(1))
    torch.testing.assert_close(sum_b, sum_u, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(avg_b, avg_u, rtol=1e-5, atol=1e-5)
    # rows of many examples per forward, 4*batch_size at most (3 and 5 split examples unevenly), longest first
    rows = [n for n, _ in shapes]
    assert sum(rows) == 48 and rows[:-1] == [4 * batch_size] * (len(rows) - 1) and rows[-1] <= 4 * batch_size
    lengths = [t for _, t in shapes]
    assert lengths == sorted(lengths, reverse=True)
    if batch_size == 5:
        assert hs.evaluate(model, EXAMPLES, "cpu", batch_size) == res_u
    assert 0 < res_u["num_correct"] < 12 or 0 < res_u["num_correct_norm"] < 12  # predictions are not all alike


def test_batched_path_scores_only_ending_positions():
    model = tiny_gpt()
    seen = []
    hook = model.lm_head.register_forward_hook(lambda m, args, out: seen.append(tuple(out.shape)))
    hs.score_batched(model, EXAMPLES[:2], "cpu", 2)
    hook.remove()
    enc = get_tokenizer()
    scored = sum(len(enc.encode(" " + e)) for ex in EXAMPLES[:2] for e in ex["endings"])
    assert seen == [(scored, 50304)]  # one forward, a logits row per scored token and no more


def test_model_returning_plain_logits(reference):
    class LogitsOnly(torch.nn.Module):  # not our GPT (full logits), logits rather than (logits, loss)
        def __init__(self, gpt):
            super().__init__()
            self.gpt = gpt

        def forward(self, idx):
            return self.gpt(idx)[0]

    model, _, res_u = reference
    assert hs.evaluate(LogitsOnly(model), EXAMPLES, "cpu", 5) == res_u


def test_evaluate_counts_modes_and_autocast():
    model = tiny_gpt().train()
    res = hs.evaluate(model, EXAMPLES, "cpu", 4)
    assert set(res) == {"num_total", "num_correct", "num_correct_norm", "acc", "acc_norm"}
    assert res["num_total"] == 12 and res["acc"] == res["num_correct"] / 12
    assert res["acc_norm"] == res["num_correct_norm"] / 12
    assert model.training  # restored
    sum_f, _ = hs.score_batched(model, EXAMPLES, "cpu", 4)
    assert not sum_f.requires_grad  # no autograd graph
    sum_bf, _ = hs.score_batched(model, EXAMPLES, "cpu", 4, autocast_dtype=torch.bfloat16)
    assert sum_bf.dtype == torch.float32 and not torch.equal(sum_bf, sum_f)  # autocast is on, losses in fp32
    torch.testing.assert_close(sum_bf, sum_f, rtol=0.05, atol=0.5)


def test_rank_shards_count_every_example_once(reference):
    model, _, full = reference
    for world_size in (2, 5, 13):  # no process group: each rank returns its own share's counts
        shares = [hs.evaluate(model, EXAMPLES, "cpu", 3, rank=r, world_size=world_size) for r in range(world_size)]
        for key in ("num_total", "num_correct", "num_correct_norm"):
            assert sum(s[key] for s in shares) == full[key]


def test_example_longer_than_block_size():
    model = tiny_gpt(block_size=64)  # example ind=4 needs 65 positions
    with pytest.raises(hs.HellaSwagError, match=r"ind=4: a row of \d+ tokens is longer than .*block_size=64"):
        hs.evaluate(model, EXAMPLES, "cpu")
    with pytest.raises(hs.HellaSwagError, match="ind=4.*block_size=64"):
        hs.evaluate_unbatched(model, EXAMPLES, "cpu")


# -----------------------------------------------------------------------------
# Data: validation errors, download into the cache


@pytest.mark.parametrize("line, error", [
    ('{"ctx": "A dog runs.", "label": 0, "endings": ["a", "b", "c"', r":3: malformed JSON"),
    (json.dumps(EXAMPLES[2] | {"label": 7}), r":3: label 7 is not an integer in 0\.\.3"),
    (json.dumps(EXAMPLES[2] | {"label": "1"}), r":3: label \"1\" is not an integer"),
    (json.dumps(EXAMPLES[2] | {"endings": ["a", "b", "c"]}), r":3: expected a list of 4 endings, got 3 endings"),
    (json.dumps(EXAMPLES[2] | {"endings": ["a", "b", "c", 4]}), r":3: every ending must be a string"),
    (json.dumps({k: v for k, v in EXAMPLES[2].items() if k != "ctx"}), r":3: 'ctx' must be a non-empty string"),
    (json.dumps({k: v for k, v in EXAMPLES[2].items() if k != "label"}), r":3: no 'label'"),
    ("[1, 2]", r":3: expected a JSON object"),
])
def test_bad_line_names_its_line_number(tmp_path, line, error):
    bad = write_jsonl(tmp_path / "bad.jsonl", lines=[json.dumps(EXAMPLES[0]), json.dumps(EXAMPLES[1]), line])
    with pytest.raises(hs.HellaSwagError, match=error) as info:
        hs.load_examples(data_file=bad)
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)


def test_load_examples_from_file(data_file, tmp_path):
    examples = hs.load_examples(data_file=data_file)
    assert examples == EXAMPLES
    write_jsonl(tmp_path / "blank.jsonl", lines=[json.dumps(EXAMPLES[0]), "", json.dumps(EXAMPLES[1])])
    assert len(hs.load_examples(data_file=tmp_path / "blank.jsonl")) == 2
    for bad, error in [(tmp_path / "missing.jsonl", "not found"), (write_jsonl(tmp_path / "e.jsonl", lines=[]),
                                                                   "no examples")]:
        with pytest.raises(hs.HellaSwagError, match=error):
            hs.load_examples(data_file=bad)


@pytest.fixture
def http_server(tmp_path):
    """Serves tmp_path/www over http://127.0.0.1:PORT and counts the requests."""
    root = tmp_path / "www"
    root.mkdir()
    hits = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def do_GET(self):
            hits.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}", hits
    server.shutdown()
    server.server_close()


def test_download_once_into_cache(http_server, tmp_path, monkeypatch):
    root, url, hits = http_server
    write_jsonl(root / "hellaswag_val.jsonl")
    monkeypatch.setenv("HELLASWAG_URL", url + "/hellaswag_{split}.jsonl")
    cache = tmp_path / "cache"
    # not rank 0: waits for rank 0 and never downloads itself (no process group here, so nothing appears)
    with pytest.raises(hs.HellaSwagError, match="missing"):
        hs.load_examples("val", cache_dir=cache, dist=Dist(rank=1, world_size=2))
    assert hits == []
    assert hs.load_examples("val", cache_dir=cache, dist=Dist(rank=0, world_size=2)) == EXAMPLES
    assert hs.load_examples("val", cache_dir=cache) == EXAMPLES  # from the cache now
    assert hits == ["/hellaswag_val.jsonl"]
    assert sorted(p.name for p in cache.iterdir()) == ["hellaswag_val.jsonl"]  # no temporary file left
    with pytest.raises(hs.HellaSwagError, match="HTTP Error 404"):  # the server has no train split
        hs.load_examples("train", cache_dir=cache)
    assert sorted(p.name for p in cache.iterdir()) == ["hellaswag_val.jsonl"]


def test_default_urls_and_cache_dir():
    assert hs.data_url("val") == "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
    assert hs.DATA_CACHE_DIR == REPO / "hellaswag"


# -----------------------------------------------------------------------------
# Command line


def test_cli_hf_folder_and_our_checkpoint_agree(tmp_path, data_file, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    folder = tmp_path / "hf"
    GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=128, n_embd=32, n_layer=2, n_head=2,
                               initializer_range=0.5)).save_pretrained(folder)
    ckpt = checkpoint(from_pretrained(str(folder)), tmp_path / "model_00000.pt")
    common = ["-d", "cpu", "--data-file", str(data_file)]
    rc, out_hf, err = run_cli(["-m", str(folder), *common], capsys)
    assert rc == 0, err
    rc, out_pt, err = run_cli(["--model", str(ckpt), "--batch-size", "5", *common], capsys)
    assert rc == 0, err
    assert totals(out_hf) == totals(out_pt) and totals(out_hf)[0] == 12
    assert out_hf[-1] == out_pt[-1]
    model = from_pretrained(str(folder))
    res = hs.evaluate_unbatched(model, EXAMPLES, "cpu")
    assert totals(out_pt) == (res["num_total"], res["num_correct"], res["num_correct_norm"])
    rc, out, _ = run_cli(["-m", str(ckpt), "--limit", "5", *common], capsys)
    assert rc == 0 and totals(out)[0] == 5


def test_cli_errors_are_one_line(tmp_path, data_file, capsys, monkeypatch):
    ckpt = checkpoint(tiny_gpt(), tmp_path / "model_00000.pt")
    bad_json = write_jsonl(tmp_path / "bad1.jsonl", lines=[json.dumps(EXAMPLES[0]), "{not json"])
    label7 = write_jsonl(tmp_path / "bad2.jsonl", lines=[json.dumps(EXAMPLES[0] | {"label": 7})])
    three = write_jsonl(tmp_path / "bad3.jsonl", lines=[json.dumps(EXAMPLES[0] | {"endings": ["a", "b", "c"]})])
    # no file and no network: an empty cache and a download that cannot connect
    monkeypatch.setenv("HELLASWAG_URL", "http://127.0.0.1:9/hellaswag_{split}.jsonl")
    empty = tmp_path / "empty_cache"
    cases = [
        (["-m", str(ckpt), "--data-file", str(bad_json)], r"bad1\.jsonl:2: malformed JSON"),
        (["-m", str(ckpt), "--data-file", str(label7)], r"bad2\.jsonl:1: label 7 is not an integer in 0\.\.3"),
        (["-m", str(ckpt), "--data-file", str(three)], r"bad3\.jsonl:1: expected a list of 4 endings, got 3"),
        (["-m", str(ckpt), "--cache-dir", str(empty)], r"could not download http://127\.0\.0\.1:9/hellaswag_val"
                                                       r"\.jsonl .*pass --data-file"),
        (["-m", str(tmp_path / "nope.pt"), "--data-file", str(data_file)], r"checkpoint .*nope\.pt not found"),
        (["-m", "gpt7", "--data-file", str(data_file)], r"unknown model 'gpt7'"),
    ]
    for argv, error in cases:
        rc, out, err = run_cli(argv + ["-d", "cpu"], capsys)
        assert rc == 2 and out == [], argv
        assert len(err) == 1 and err[0].startswith("hellaswag.py: error: ") and re.search(error, err[0]), err
    assert not any(empty.iterdir()) if empty.exists() else True  # no half-written download left behind


# -----------------------------------------------------------------------------
# Subprocesses: the script itself, torchrun with 2 Gloo processes, a clean import


def _env():
    return os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def test_torchrun_two_processes_give_the_same_totals(tmp_path, data_file, http_server):
    ckpt = checkpoint(tiny_gpt(seed=1), tmp_path / "model_00000.pt")
    args = ["hellaswag.py", "-m", str(ckpt), "-d", "cpu", "--batch-size", "2",
            "--limit", "11"]  # 11 examples: the ranks get 6 and 5
    one = subprocess.run([sys.executable, *args, "--data-file", str(data_file)], cwd=REPO, env=_env(),
                         capture_output=True, text=True, timeout=120)
    assert one.returncode == 0, one.stderr
    assert "row" in one.stderr  # the progress bar
    # the 2-rank run downloads the data: rank 0 fetches it once into the empty cache, rank 1 waits
    root, url, hits = http_server
    write_jsonl(root / "hellaswag_val.jsonl")
    cache = tmp_path / "cache"
    env = _env() | {"HELLASWAG_URL": url + "/hellaswag_{split}.jsonl"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args,
                          "--cache-dir", str(cache)], cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert two.returncode == 0, two.stderr[-3000:]
    assert hits == ["/hellaswag_val.jsonl"] and [p.name for p in cache.iterdir()] == ["hellaswag_val.jsonl"]
    assert "x2 " in two.stdout  # really ran as 2 ranks
    assert totals(one.stdout.strip().splitlines()) == totals(two.stdout.strip().splitlines())
    assert totals(one.stdout.strip().splitlines())[0] == 11


def test_script_error_exit_code_and_no_traceback(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", lines=[json.dumps(EXAMPLES[0]), json.dumps(EXAMPLES[1] | {"label": 7})])
    r = subprocess.run([sys.executable, "hellaswag.py", "-m", "x.pt", "--data-file", str(bad), "-d", "cpu"],
                       cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [f"hellaswag.py: error: {bad}:2: label 7 is not an integer in 0..3"]


def test_import_opens_no_connection_and_no_process_group(tmp_path):
    code = ("import socket, sys\n"
            "def refuse(*a, **k):\n    raise OSError('network access during import')\n"
            "socket.socket.connect = socket.create_connection = refuse\n"
            "import hellaswag, torch.distributed as dist\n"
            "assert not (dist.is_available() and dist.is_initialized())\n"
            "print(hellaswag.DATA_CACHE_DIR)\n")
    before = set(tmp_path.iterdir())
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert set(tmp_path.iterdir()) == before  # wrote nothing where it ran
