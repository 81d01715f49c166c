import json

import pytest

from peft_cp.blip.configs import read_settings


def test_read_settings_returns_the_object(tmp_path):
    path = tmp_path / "settings.json"
    path.write_text(json.dumps({"rank": 64, "epochs": 2}))

    assert read_settings(path, {"rank", "epochs", "batch_size"}) == {"rank": 64, "epochs": 2}


def test_unknown_setting_is_named(tmp_path):
    path = tmp_path / "settings.json"
    path.write_text(json.dumps({"rank": 64, "learning_rte": 1e-4}))

    with pytest.raises(ValueError, match=r"settings.json: unknown setting\(s\) \['learning_rte'\]"):
        read_settings(path, {"rank", "learning_rate"})


def test_invalid_json_names_file_and_line(tmp_path):
    path = tmp_path / "settings.json"
    path.write_text('{\n  "rank": 64,\n  "epochs": \n}\n')

    with pytest.raises(ValueError, match=r"settings.json, line 4: invalid JSON"):
        read_settings(path, {"rank", "epochs"})


def test_a_list_is_not_settings(tmp_path):
    path = tmp_path / "settings.json"
    path.write_text("[1, 2]")

    with pytest.raises(ValueError, match="expected a JSON object of settings, got list"):
        read_settings(path, {"rank"})
