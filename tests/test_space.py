from pathlib import Path

import pytest

from hpsearch.errors import SpaceError
from hpsearch.space import load_space, parse_space

REPO = Path(__file__).resolve().parents[1]


def test_shipped_default_space():
    space = load_space(REPO / "studies" / "mlp.toml")
    by_name = {p.name: p for p in space.params}
    assert set(by_name) == {"num_layers", "layer_size", "activation", "weight_decay", "lr", "batch_size", "dropout"}
    # bounded by measurement (see the file's header): what never reached the top quarter is out
    assert (by_name["num_layers"].low, by_name["num_layers"].high) == (2, 4)
    assert by_name["layer_size"].log and (by_name["layer_size"].low, by_name["layer_size"].high) == (128, 1024)
    assert set(by_name["activation"].choices) == {"relu", "leaky_relu"}
    assert by_name["weight_decay"].log and by_name["lr"].log and by_name["lr"].high == 1e-2
    assert by_name["batch_size"].choices == (128, 256, 512)
    assert space.fixed["optimizer"] == "adamw"
    assert "epochs" not in by_name  # the budget is not sampled


def test_the_wide_space_keeps_what_the_default_left_out():
    wide = {p.name: p for p in load_space("mlp-wide").params}
    assert set(wide["activation"].choices) == {"relu", "sigmoid", "tanh", "leaky_relu"}
    assert set(wide["optimizer"].choices) == {"adamw", "sgd"}
    assert wide["batch_size"].choices == (64, 128, 256, 512, 1024)
    assert (wide["layer_size"].low, wide["num_layers"].high) == (32, 5)
    default_starts = list(load_space("mlp").starts)
    first = [{k: v for k, v in start.items() if k not in ("optimizer", "batch_norm")}
             for start in load_space("mlp-wide").starts[:len(default_starts)]]
    assert first == default_starts  # the same starts (optimizer and batch norm fixed in the default)
    assert [s["batch_norm"] for s in load_space("mlp-wide").starts] == [True, True, True, False]
    assert load_space("mlp").fixed["batch_norm"] is True


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_packaged_copy_matches_repo_copy(name):
    assert (REPO / "studies" / f"{name}.toml").read_text() == (REPO / "hpsearch" / "spaces" / f"{name}.toml").read_text()


def test_packaged_default_when_no_local_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert len(load_space().params) == 7
    assert load_space("cnn").source == "hpsearch/spaces/cnn.toml"  # a shipped space by name, from anywhere
    (tmp_path / "studies").mkdir()
    (tmp_path / "studies" / "cnn.toml").write_text((REPO / "studies" / "cnn.toml").read_text())
    assert load_space("cnn").source == "studies/cnn.toml"  # a local copy wins, as for mlp.toml


@pytest.mark.parametrize("text,match", [
    ("[params.num_layers\ntype='int'", "not valid TOML"),
    ("", "declares no"),
    ("[params.depth]\ntype='int'\nlow=1\nhigh=2", "unknown parameter 'depth'"),
    ("[params.num_layers]\ntype='int'\nlow=5\nhigh=2", "above high"),
    ("[params.num_layers]\ntype='int'\nlow=0\nhigh=2", "not in range"),
    ("[params.lr]\ntype='float'\nlow=0.0\nhigh=0.1\nlog=true", "not in range"),
    ("[params.weight_decay]\ntype='float'\nlow=0.0\nhigh=0.1\nlog=true", "low must be > 0"),
    ("[params.activation]\ntype='categorical'\nchoices=['relu','gelu']", "gelu"),
    ("[params.optimizer]\ntype='categorical'\nchoices=[]", "non-empty"),
    ("[params.lr]\ntype='normal'\nlow=0.1\nhigh=0.2", "type must be"),
    ("[params.lr]\ntype='float'\nlow=0.1", "needs low and high"),
    ("[params.num_layers]\ntype='float'\nlow=1\nhigh=3", "int"),
    ("[params.lr]\ntype='float'\nlow=0.1\nhigh=0.2\nstep=-1", "step"),
    ("[params.lr]\ntype='float'\nlow=0.1\nhigh=0.2\ncolour='red'", "unexpected keys"),
    ("[params.lr]\ntype='float'\nlow=0.1\nhigh=0.2\n[fixed]\nlr=0.1", "both sampled and fixed"),
    ("[params.lr]\ntype='float'\nlow=0.1\nhigh=0.2\n[fixed]\nmomentum=1.5", "momentum"),
    ("[params.lr]\ntype='float'\nlow=0.1\nhigh=0.2\n[other]\nx=1", "unexpected top-level"),
    ("[params.batch_norm]\ntype='int'\nlow=0\nhigh=1", "a categorical parameter"),
    ("[params.lr]\ntype='float'\nlow=0.1\nhigh=0.2\n[fixed]\nbatch_norm=1", "batch_norm must be bool"),
    ("[params.lr]\ntype='float'\nlow=0.1\nhigh=0.2\n[fixed]\nfamily='cnn'\nbatch_norm=true", "only applies to the mlp"),
    ("[params.family]\ntype='categorical'\nchoices=['mlp','cnn']\n[params.batch_norm]\ntype='categorical'\n"
     "choices=[false,true]", "only applies to the mlp"),
])
def test_malformed_spaces_are_refused(text, match):
    with pytest.raises(SpaceError, match=match):
        parse_space(text, "bad.toml")


def test_batch_norm_is_sampled_or_fixed_as_true_or_false():
    space = parse_space("[params.batch_norm]\ntype='categorical'\nchoices=[false, true]\n"
                        "[[start]]\nbatch_norm=true\n", "ok.toml")
    assert space.params[0].choices == (False, True) and space.starts == ({"batch_norm": True},)
    assert parse_space("[params.lr]\ntype='float'\nlow=0.1\nhigh=0.2\n[fixed]\nbatch_norm=true").fixed == {"batch_norm": True}


def test_unreadable_space_file(tmp_path):
    with pytest.raises(SpaceError, match="cannot read"):
        load_space(tmp_path / "missing.toml")
