"""Operations: checkpoint durability and ownership, private key files."""

from __future__ import annotations

import json
import os
import stat

import pytest

from flora.checkpoint import CheckpointError, remove_checkpoint, save_round
from flora.rounds import RoundUpdate


def test_round_file_is_fsynced_before_state_json_names_it(tmp_path, monkeypatch):
    """Every file is fsynced before its rename, and the round file (and its directory) before
    ``state.json`` is replaced: a crash can never leave a state naming a round that is not on disk."""
    import torch

    from flora import checkpoint
    from flora.config import RunConfig

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "fsync", fsync)
    monkeypatch.setattr(checkpoint.os, "replace", replace)
    config = RunConfig(out_dir=str(tmp_path))
    save_round(tmp_path, config, [RoundUpdate(round=1, merge={"l": torch.ones(2, 3)})], [{"round": 1}])
    root = tmp_path / "checkpoint"
    round_file, state = str(root / "rounds" / "00001.safetensors"), str(root / "state.json")
    order = [e for e in events]
    assert order.index(("fsync", round_file + ".tmp")) < order.index(("replace", round_file))
    assert order.index(("fsync", str(root / "rounds"))) < order.index(("replace", state))
    assert order.index(("fsync", state + ".tmp")) < order.index(("replace", state)) < order.index(("fsync", str(root)))


def _checkpoint(root, extra: str | None = None):
    (root / "rounds").mkdir(parents=True)
    (root / "rounds" / "00001.safetensors").write_bytes(b"x")
    (root / "state.json").write_text(json.dumps({"format": 1}))
    if extra:
        (root / extra).write_text("not FLoRA's")


def test_remove_checkpoint_deletes_only_what_flora_wrote(tmp_path):
    _checkpoint(tmp_path / "a")
    remove_checkpoint(tmp_path / "a")
    assert not (tmp_path / "a").exists()
    for name, setup in [("foreign file", lambda r: _checkpoint(r, "notes.txt")),
                        ("foreign state", lambda r: (r.mkdir(), (r / "state.json").write_text("[1, 2]"))),
                        ("file in rounds", lambda r: (_checkpoint(r), (r / "rounds" / "keep.bin").write_text("x")))]:
        root = tmp_path / name.replace(" ", "-")
        setup(root)
        before = sorted(p.relative_to(root) for p in root.rglob("*"))
        with pytest.raises(CheckpointError, match="not a FLoRA checkpoint"):
            remove_checkpoint(root)
        assert sorted(p.relative_to(root) for p in root.rglob("*")) == before, name
    target = tmp_path / "precious"
    target.mkdir()
    (target / "data").write_text("keep")
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(CheckpointError, match="not a directory"):
        remove_checkpoint(tmp_path / "link")
    assert (target / "data").read_text() == "keep"


def test_fresh_run_refuses_to_delete_a_foreign_checkpoint_dir(assets_dir, tmp_path, capsys):
    from flora.cli import main
    from test_federation import tiny_config

    config = tiny_config(assets_dir, tmp_path, rounds=1)
    foreign = tmp_path / "out" / "checkpoint"
    foreign.mkdir(parents=True)
    (foreign / "thesis.tex").write_text("years of work")
    import tomli_w
    path = tmp_path / "run.toml"
    path.write_text(tomli_w.dumps({"run": config.to_dict()}))
    assert main(["run", "--config", str(path), "--engine", "local", "--quiet"]) == 2
    assert "is not a FLoRA checkpoint" in capsys.readouterr().err
    assert (foreign / "thesis.tex").read_text() == "years of work"


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_private_keys_are_0600_from_the_first_byte_and_refused_when_exposed(tmp_path, monkeypatch):
    from flora import deploy_keys
    from flora.deploy_keys import KeyFileError, write_node_key, write_tls

    seen = []  # the mode of every file at every chmod/rename: a key readable by others, even briefly, fails
    real_chmod, real_replace = os.chmod, os.replace

    def chmod(path, mode, *args, **kwargs):
        seen.append((str(path), _mode(type(tmp_path)(path))))
        return real_chmod(path, mode, *args, **kwargs)

    def replace(src, dst):
        seen.append((str(dst), _mode(type(tmp_path)(src))))
        return real_replace(src, dst)

    monkeypatch.setattr(deploy_keys.os, "chmod", chmod)
    monkeypatch.setattr(deploy_keys.os, "replace", replace)
    old_umask = os.umask(0)  # the most permissive umask: modes come from the code alone
    try:
        paths = write_tls(tmp_path / "tls", ["127.0.0.1"])
        private, _ = write_node_key(tmp_path / "keys", "node")
    finally:
        os.umask(old_umask)
    keys = [paths["ca.key"], paths["server.key"], private]
    assert all(_mode(p) == 0o600 for p in keys)
    assert {p for p, _ in seen} >= {str(p) for p in keys}
    assert all(mode == 0o600 for path, mode in seen if path in {str(p) for p in keys}), seen
    assert not list((tmp_path / "tls").glob(".*.tmp")) and not list((tmp_path / "keys").glob(".*.tmp"))
    os.chmod(paths["server.key"], 0o644)  # exposed: refuse to reuse it silently
    with pytest.raises(KeyFileError, match="mode 0644"):
        write_tls(tmp_path / "tls", ["127.0.0.1"])
    os.chmod(private, 0o640)
    with pytest.raises(KeyFileError, match="chmod 600"):
        write_node_key(tmp_path / "keys", "node")
