"""Runs, datasets and tokenizers may live at URLs (gs://...): paths keep their scheme all the
way to Orbax, and local ones behave as before."""

import json

import ml_collections
import pytest

from flipjax.storage import storage_path, write_bytes_whole
from flipjax.train import checkpoint, metrics


def test_urls_keep_their_scheme_and_local_paths_become_absolute(tmp_path, monkeypatch):
    assert str(storage_path("gs://bucket/run") / "checkpoints") == "gs://bucket/run/checkpoints"
    monkeypatch.chdir(tmp_path)
    assert str(storage_path("run")) == str(tmp_path / "run")


def test_a_gs_workdir_reaches_orbax_as_a_gs_directory(monkeypatch, tmp_path):
    seen = {}

    def manager(directory, **kwargs):
        seen["directory"] = str(directory)

    monkeypatch.setattr(checkpoint.ocp, "CheckpointManager", manager)
    monkeypatch.chdir(tmp_path)
    cfg = ml_collections.ConfigDict(dict(keep=2, async_save=True))
    checkpoint.make_manager("gs://bucket/run", cfg)
    assert seen["directory"] == "gs://bucket/run/checkpoints"
    checkpoint.make_manager("local_run", cfg)
    assert seen["directory"] == str(tmp_path / "local_run" / "checkpoints")


def test_write_bytes_whole_replaces_and_leaves_no_temporary(tmp_path):
    path = storage_path(tmp_path / "sub" / "metrics.jsonl")
    write_bytes_whole(path, b"one\n")
    write_bytes_whole(path, b"one\ntwo\n")
    assert path.read_bytes() == b"one\ntwo\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["metrics.jsonl"]


def test_metrics_at_a_url_are_written_whole_at_intervals_and_at_close(tmp_path, monkeypatch):
    """An object store cannot append: there the jsonl is rewritten whole, not every step. A
    local workdir appends, and a resume drops the lines after its checkpoint either way."""
    jsonl = tmp_path / "metrics.jsonl"
    steps = lambda: [json.loads(line)["step"] for line in jsonl.read_text().splitlines()]
    monkeypatch.setattr(metrics, "is_url", lambda path: True)
    monkeypatch.setattr(metrics, "URL_REWRITE_SECONDS", 3600.0)
    writer = metrics.MetricWriter(str(tmp_path), resumed_step=0)
    writer.write(1, {"train/loss": 1.0})
    writer.write(2, {"train/loss": 0.5})
    assert steps() == []  # the interval has not passed
    writer.close()
    assert steps() == [1, 2]
    monkeypatch.setattr(metrics, "URL_REWRITE_SECONDS", 0.0)
    writer = metrics.MetricWriter(str(tmp_path), resumed_step=1)
    writer.write(2, {"train/loss": 0.25})
    assert steps() == [1, 2]
    writer.close()
    monkeypatch.undo()
    writer = metrics.MetricWriter(str(tmp_path), resumed_step=1)
    assert steps() == [1]
    writer.write(2, {"train/loss": 0.125})
    assert steps() == [1, 2]
    assert json.loads(jsonl.read_text().splitlines()[1])["train/loss"] == 0.125
    writer.close()


@pytest.mark.parametrize("url", [False, True])
def test_metrics_lines_are_strict_json_and_a_resumed_step_is_amended_in_place(
        tmp_path, monkeypatch, url):
    """A skipped step's non-finite loss is null (jq and JSON.parse refuse NaN); results added
    to the resumed step's line replace it, before the lines that follow, for a local file
    (rewritten, then appended to) as at a URL."""
    jsonl = tmp_path / "metrics.jsonl"
    monkeypatch.setattr(metrics, "is_url", lambda path: url)
    writer = metrics.MetricWriter(str(tmp_path), resumed_step=0)
    writer.write(1, {"train/loss": float("nan")})
    writer.write(2, {"train/loss": 0.5})
    writer.write(3, {"train/loss": 0.25})  # after the checkpoint at 2: dropped on resume
    writer.close()
    assert jsonl.read_text().splitlines()[0] == '{"step": 1, "train/loss": null}'
    writer = metrics.MetricWriter(str(tmp_path), resumed_step=2)
    assert writer.logged_at_resume() == {"step": 2, "train/loss": 0.5}
    writer.amend(2, {"probe/acc": 90.0})
    writer.write(3, {"train/loss": 0.125})
    writer.close()
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert rows == [{"step": 1, "train/loss": None},
                    {"step": 2, "train/loss": 0.5, "probe/acc": 90.0},
                    {"step": 3, "train/loss": 0.125}]


def test_amending_a_line_is_one_whole_rewrite(tmp_path, monkeypatch):
    """Evaluation results join their step's line in one rewrite of the local file: a process
    killed on the way (here as it reopens the file to append) leaves the step's training
    metrics and results, not a file without the step."""
    writer = metrics.MetricWriter(str(tmp_path), resumed_step=0)
    writer.write(1, {"train/loss": 1.0})
    writer.write(2, {"train/loss": 0.5})

    path_type = type(writer.jsonl_path)
    open_path = path_type.open

    def killed_at_append(self, mode="r", *args, **kwargs):
        if "a" in mode:
            raise KeyboardInterrupt
        return open_path(self, mode, *args, **kwargs)

    monkeypatch.setattr(path_type, "open", killed_at_append)
    with pytest.raises(KeyboardInterrupt):
        writer.amend(2, {"probe/acc": 90.0})
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1] == {"step": 2, "train/loss": 0.5, "probe/acc": 90.0}


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = storage_path(tmp_path / "config.json")
    write_bytes_whole(path, b"old")

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("flipjax.storage.os.fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_bytes_whole(path, b"new")
    assert path.read_bytes() == b"old" and [p.name for p in path.parent.iterdir()] == [
        "config.json"]


def test_a_resume_skips_a_cut_short_metrics_line_and_names_a_corrupt_one(tmp_path):
    """A crash mid-append leaves a line without its newline, which a resume drops; a complete
    line that is not a metrics record stops the resume with the file and line number."""
    jsonl = storage_path(tmp_path / "metrics.jsonl")
    jsonl.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "tra')
    assert metrics.lines_up_to(jsonl, 2) == ['{"step": 1}\n', '{"step": 2}\n']
    for bad in ('not json', '{"step": null}', '[1, 2]'):
        jsonl.write_text(f'{{"step": 1}}\n{bad}\n')
        with pytest.raises(ValueError, match=r"metrics\.jsonl:2: not a metrics line"):
            metrics.lines_up_to(jsonl, 2)
