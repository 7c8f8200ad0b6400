"""bench/smoke.sh --quick on the CPU: each entry point once (the first check of a GPU, in tiny shapes here). A file of
its own, so that the test runner's two workers run it beside the full smoke run."""

import re

from test_smoke import QUICK, smoke, stages


def test_smoke_script_quick_mode_runs_each_entry_point_once(tmp_path):
    text = smoke(tmp_path, "--quick")
    assert stages(text) == QUICK, text[-4000:]
    assert re.search(r"^smoke: quick stages ok on cpu in \d+ s$", text.rstrip().splitlines()[-1])
    assert re.search(r"^step 11/12 \(91\.7%\) \| HellaSwag acc_norm [\d.]+ \| \d+/24 right$", text, re.M)
    assert "resuming from" in text and "at step 12" in text and "saved" in text
    assert re.search(r"^resuming from \S+/modern/model_00003\.pt at step 4$", text, re.M)
    assert (tmp_path / "smoke" / "hf" / "model.safetensors").is_file()
    assert [p.name for p in sorted((tmp_path / "smoke" / "run").glob("model_*.pt"))] == ["model_00011.pt",
                                                                                       "model_00013.pt"]
