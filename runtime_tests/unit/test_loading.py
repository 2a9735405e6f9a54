"""Model loading: factory paths, safe weights loading, input shapes."""

import pickle

import pytest
import torch
from safetensors.torch import save_file

from edgecompress.errors import ConfigError, LoadError
from edgecompress.loading import load_model, parse_shape, read_state_dict

FACTORY = """
import torch.nn as nn
def build():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16 * 16, 4))
def not_a_module():
    return 42
"""


@pytest.fixture
def factory_file(tmp_path):
    path = tmp_path / "my_net.py"
    path.write_text(FACTORY)
    return path


def test_parse_shape():
    assert parse_shape("1x3x224x224") == (1, 3, 224, 224)
    for bad in ("", "1x", "ax3", "1x0x3", "-1x3"):
        with pytest.raises(ConfigError):
            parse_shape(bad)


def test_file_factory_needs_input_shape(factory_file):
    with pytest.raises(ConfigError, match="--input-shape"):
        load_model(f"{factory_file}:build")
    loaded = load_model(f"{factory_file}:build", input_shape="1x3x16x16")
    assert loaded.input_spec.shape == (1, 3, 16, 16)


def test_module_factory():
    loaded = load_model("edgecompress.models.convnets:lenet5", input_shape="1x1x28x28")
    assert isinstance(loaded.module, torch.nn.Sequential)


@pytest.mark.parametrize("target,message", [
    ("nosuch/file.py:build", "no such file"),
    ("edgecompress.nosuchmodule:build", "cannot import"),
    ("edgecompress.models.convnets:nosuch", "has no callable"),
])
def test_bad_factory_paths(target, message):
    with pytest.raises(LoadError, match=message):
        load_model(target, input_shape="1x3x8x8")


def test_factory_returning_no_module(factory_file):
    with pytest.raises(LoadError, match="expected a torch.nn.Module"):
        load_model(f"{factory_file}:not_a_module", input_shape="1x3x8x8")


def test_weights_roundtrip_pt_and_safetensors(tmp_path):
    source = load_model("lenet5").module
    state = source.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "w.safetensors")
    torch.save(state, tmp_path / "w.pt")
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "ckpt.pth")
    for name in ("w.safetensors", "w.pt", "ckpt.pth"):
        loaded = load_model("lenet5", weights=tmp_path / name).module
        assert torch.equal(loaded[0].weight, source[0].weight)


class Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickled_code_is_refused_not_run(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"weight": Evil()}, f)
    with pytest.raises(LoadError, match="carries code"):
        read_state_dict(path)
    assert "this must never run" not in capsys.readouterr().out


def test_corrupt_and_mismatched_weights(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00garbage")
    for name in ("bad.pt", "bad.safetensors"):
        with pytest.raises(LoadError, match="corrupt|not a valid"):
            read_state_dict(tmp_path / name)
    torch.save({"nope.weight": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(LoadError, match="do not match the model: missing"):
        load_model("lenet5", weights=tmp_path / "other.pt")
    with pytest.raises(LoadError, match="does not exist"):
        read_state_dict(tmp_path / "missing.pt")


def test_whole_module_checkpoint_is_refused(tmp_path):
    path = tmp_path / "module.pt"
    torch.save(torch.nn.Linear(2, 2), path)  # a pickled module: loading it would need its code
    with pytest.raises(LoadError, match="carries code"):
        read_state_dict(path)
