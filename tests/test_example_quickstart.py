"""The quickstart example: adapt, train, save and reload a small BLIP."""

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import quickstart  # noqa: E402


def test_quickstart_lowers_the_loss_and_reloads_the_same_adapter(capsys):
    quickstart.main()

    printed = capsys.readouterr().out
    assert "trainable params: 1,432" in printed
    losses = [float(value) for value in re.findall(r"matching loss (\d+\.\d+)", printed)]
    assert len(losses) == 5 and losses[-1] < 0.8 * losses[0]
    assert "max output difference 0.0e+00" in printed
