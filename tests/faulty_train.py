"""train_gpt2.py with the faults GPT2_FAULTS asks for (support/faults.py), for the fault tests: launched as users
launch train_gpt2.py (`python tests/faulty_train.py ARGS`, `torchrun ... tests/faulty_train.py ARGS`), it runs the
same main() on the same training code, with train_step, evaluate and the checkpoint writer wrapped."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo: run as a script, tests/ is sys.path[0]

import train_gpt2  # noqa: E402
from support import faults  # noqa: E402

if __name__ == "__main__":
    with faults.injected(train_gpt2):
        train_gpt2.main()
