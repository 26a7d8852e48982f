"""The typed params loader: every key checked, errors name the key and list the valid ones."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from mflag.params import Params, ParamsError, load
from tests.conftest import REPO, deep_merge, repo_params_dict


def _write(tmp_path, data) -> str:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def test_repository_params_load():
    p = load(REPO / "params.yaml")
    assert isinstance(p, Params)
    assert p.loss.ortho_weight == 1.0 and p.loss.ortho_offdiag_weight == pytest.approx(0.0051)
    for ds in ("mimic", "chexpert", "rsna", "siim", "covidx", "objcxr", "nih"):
        assert getattr(p.data, ds).root


def test_misspelt_key_is_named_with_the_valid_ones(tmp_path):
    data = repo_params_dict()
    data["loss"]["orth_weight"] = data["loss"].pop("ortho_weight")
    with pytest.raises(ParamsError) as err:
        load(_write(tmp_path, data))
    msg = str(err.value)
    assert "`loss.orth_weight`" in msg
    assert "Did you mean `loss.ortho_weight`" in msg
    assert "ortho_weight, ortho_offdiag_weight" in msg


def test_missing_key_is_named(tmp_path):
    data = repo_params_dict()
    del data["data"]["rsna"]["root"]
    with pytest.raises(ParamsError, match=r"missing key `data\.rsna\.root`"):
        load(_write(tmp_path, data))


@pytest.mark.parametrize(
    "override, key",
    [
        ({"seed": "42"}, "seed"),
        ({"seed": 4.5}, "seed"),
        ({"loss": {"ortho_weight": "high"}}, "loss.ortho_weight"),
        ({"synthetic": {"covidx": {"style": {"equalize": "yes"}}}}, "synthetic.covidx.style.equalize"),
        ({"synthetic": {"rsna": {"patients": True}}}, "synthetic.rsna.patients"),
        ({"data": {"siim": "data/siim"}}, "data.siim"),
    ],
)
def test_wrong_type_is_named(tmp_path, override, key):
    with pytest.raises(ParamsError) as err:
        load(_write(tmp_path, deep_merge(repo_params_dict(), override)))
    assert f"`{key}`" in str(err.value)


def test_integer_is_accepted_where_a_float_is_expected(tmp_path):
    p = load(_write(tmp_path, deep_merge(repo_params_dict(), {"loss": {"ortho_weight": 2}})))
    assert p.loss.ortho_weight == 2.0 and isinstance(p.loss.ortho_weight, float)


def test_unknown_finding_in_prevalence_is_named(tmp_path):
    data = repo_params_dict()
    data["synthetic"]["rsna"]["prevalence"]["pneumonia"] = 0.2
    with pytest.raises(ParamsError, match=r"synthetic\.rsna\.prevalence\.pneumonia"):
        load(_write(tmp_path, data))


def test_out_of_range_fraction_is_named(tmp_path):
    with pytest.raises(ParamsError, match=r"data\.rsna\.valid_fraction"):
        load(_write(tmp_path, deep_merge(repo_params_dict(), {"data": {"rsna": {"valid_fraction": 1.5}}})))


def test_stage_stops_with_the_key_named_and_no_traceback(tmp_path):
    data = repo_params_dict()
    data["loss"]["orth_weight"] = data["loss"].pop("ortho_weight")
    _write(tmp_path, data)
    proc = subprocess.run(
        [sys.executable, str(REPO / "stages" / "synthesize.py")], cwd=tmp_path, capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "loss.orth_weight" in proc.stderr and "ortho_weight" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "data").exists()  # nothing was written
