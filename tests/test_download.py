"""Stage `download`: sources, class-name mapping, selection, errors, resumption. All offline."""

from __future__ import annotations

import hashlib
import io

import datasets
import pandas as pd
import pytest
from PIL import Image

from impressionist import download
from impressionist.errors import DEMO_HINT, UserError
from impressionist.synthetic import write_synthetic_wikiart

LAYOUT_COLUMNS = ["id", "file", "artist", "genre", "style", "width", "height", "sha256", "source"]
MAX_IMAGES = 12
SEED = 5


def config(source, **overrides):
    cfg = {"source": str(source), "style": "Impressionism", "artists": [], "max_images": MAX_IMAGES, "seed": SEED}
    cfg.update(overrides)
    return cfg


def synthetic_mirror(folder, shards=1):
    """A local parquet mirror holding what the synthetic source generates for MAX_IMAGES, SEED."""
    folder.mkdir(parents=True, exist_ok=True)
    single = write_synthetic_wikiart(folder / "all.parquet", n_images=2 * MAX_IMAGES, seed=SEED)
    if shards == 1:
        return single
    table = datasets.Dataset.from_parquet(str(single))
    single.unlink()
    for i in range(shards):
        table.shard(shards, i, contiguous=True).to_parquet(str(folder / f"train-{i:05d}-of-{shards:05d}.parquet"))
    return folder


def raw_state(raw_dir):
    """Everything a run leaves in data/raw: the table (without `source`) and each file's bytes hash."""
    table = pd.read_parquet(raw_dir / "metadata.parquet")
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((raw_dir / "images").iterdir())}
    return table.drop(columns="source").to_dict("records"), files


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    """A single-file local mirror (read-only for the tests that share it)."""
    return synthetic_mirror(tmp_path_factory.mktemp("mirror"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted synthetic download, to compare other runs against."""
    raw = tmp_path_factory.mktemp("reference") / "raw"
    summary = download.run(config("synthetic"), raw)
    return raw, summary


def test_synthetic_source_writes_the_layout(reference):
    raw, summary = reference
    table = pd.read_parquet(raw / "metadata.parquet")
    assert list(table.columns) == LAYOUT_COLUMNS
    assert len(table) == MAX_IMAGES == summary.kept
    assert set(table["style"]) == {"Impressionism"}
    assert set(table["source"]) == {"synthetic"}
    assert not (raw / ".partial").exists()
    assert sorted(p.name for p in (raw / "images").iterdir()) == sorted(f.split("/")[1] for f in table["file"])
    for row in table.itertuples():
        data = (raw / row.file).read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        assert row.sha256 == digest and row.id == digest[:16]
        if row.width:  # undecodable headers are kept as .bin with size 0 for the filter to reject
            with Image.open(io.BytesIO(data)) as image:
                assert image.size == (row.width, row.height)
                assert row.file.endswith({"JPEG": ".jpg", "PNG": ".png"}[image.format])
    assert summary.per_artist == table["artist"].value_counts().to_dict()
    assert summary.skipped.get("other style", 0) > 0


def test_local_folder_and_file_read_like_the_synthetic_source(tmp_path, reference, mirror):
    expected = raw_state(reference[0])
    folder = synthetic_mirror(tmp_path / "mirror", shards=3)
    download.run(config(folder), tmp_path / "from_folder")
    assert raw_state(tmp_path / "from_folder") == expected
    assert set(pd.read_parquet(tmp_path / "from_folder" / "metadata.parquet")["source"]) == {str(folder)}

    download.run(config(mirror), tmp_path / "from_file")
    assert raw_state(tmp_path / "from_file") == expected


def test_hub_source_uses_the_same_streaming_code(tmp_path, monkeypatch, reference, mirror):
    real_load_dataset = datasets.load_dataset
    calls = []

    def fake_hub(path, *args, **kwargs):
        calls.append((path, kwargs))
        if path == "huggan/wikiart":  # stand in for the Hub with the same rows
            return real_load_dataset("parquet", data_files=[str(mirror)], split=kwargs["split"], streaming=True)
        return real_load_dataset(path, *args, **kwargs)

    monkeypatch.setattr(download, "check_hub_reachable", lambda dataset_id: calls.append(("checked", dataset_id)))
    monkeypatch.setattr(datasets, "load_dataset", fake_hub)
    download.run(config("huggan/wikiart"), tmp_path / "raw")
    assert calls[0] == ("checked", "huggan/wikiart")
    assert calls[1] == ("huggan/wikiart", {"split": "train", "streaming": True})
    assert raw_state(tmp_path / "raw") == raw_state(reference[0])


def test_hub_offline_is_one_clear_error_before_any_output(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("download:\n  source: huggan/wikiart\n  style: Impressionism\n")
    with pytest.raises(SystemExit) as exit_info:
        download.main(["--params", "params.yaml"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert "HF_HUB_OFFLINE" in err and "local parquet mirror" in err and DEMO_HINT in err
    assert not (tmp_path / "data").exists()


def test_unreachable_hub_is_one_clear_error(tmp_path, monkeypatch):
    from huggingface_hub import HfApi, constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def no_network(self, repo_id, **kwargs):
        assert kwargs.get("timeout"), "the reachability check must not hang"
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(HfApi, "dataset_info", no_network)
    with pytest.raises(UserError) as error:
        download.run(config("huggan/wikiart"), tmp_path / "raw")
    message = str(error.value)
    assert "\n" not in message
    assert "cannot reach the Hugging Face Hub" in message and "Name or service not known" in message
    assert "download.source" in message and DEMO_HINT in message
    assert not (tmp_path / "raw").exists()


@pytest.mark.parametrize("key, value, valid_example", [
    ("style", "Impresionism", "Post_Impressionism"),
    ("artists", ["claude-monet", "claude-monnet"], "pierre-auguste-renoir"),
])
def test_unknown_names_list_the_valid_ones(tmp_path, key, value, valid_example, mirror):
    with pytest.raises(UserError) as error:
        download.run(config(mirror, **{key: value}), tmp_path / "raw")
    message = str(error.value)
    assert "\n" not in message
    bad = value if isinstance(value, str) else value[1]
    assert repr(bad) in message and valid_example in message
    if key == "artists":
        assert "'claude-monet'" not in message  # only the unknown name is blamed
    assert not (tmp_path / "raw").exists()


@pytest.mark.parametrize("make_source, expected", [
    (lambda tmp: tmp / "nowhere" / "wikiart.parquet", "does not exist"),
    (lambda tmp: (tmp / "empty").mkdir() or tmp / "empty", "holds no .parquet files"),
])
def test_missing_or_empty_local_source(tmp_path, make_source, expected):
    with pytest.raises(UserError, match=expected):
        download.run(config(make_source(tmp_path)), tmp_path / "raw")
    assert not (tmp_path / "raw").exists()


def test_artist_allow_list(tmp_path, reference, mirror):
    wanted = sorted(reference[1].per_artist)[:2]
    download.run(config(mirror, artists=wanted, max_images=0), tmp_path / "raw")
    table = pd.read_parquet(tmp_path / "raw" / "metadata.parquet")
    assert set(table["artist"]) == set(wanted)
    assert (table["artist"].value_counts() >= 1).all()


def test_no_matching_rows_is_an_error_that_leaves_nothing(tmp_path, mirror):
    with pytest.raises(UserError, match="no images of style Impressionism by canaletto"):
        download.run(config(mirror, artists=["canaletto"]), tmp_path / "raw")
    assert not (tmp_path / "raw").exists()


def test_class_names_come_from_the_files_own_features(tmp_path):
    """A mirror whose ClassLabel order differs from huggan/wikiart's still decodes to the right names."""
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 120, 40)).save(buffer, "JPEG")
    features = datasets.Features({
        "image": datasets.Image(),
        "artist": datasets.ClassLabel(names=["zz-nobody", "claude-monet"]),
        "genre": datasets.ClassLabel(names=["landscape", "portrait"]),
        "style": datasets.ClassLabel(names=["Baroque", "Impressionism"]),
    })
    rows = {"image": [{"bytes": buffer.getvalue(), "path": None}], "artist": [1], "genre": [1], "style": [1]}
    path = tmp_path / "mirror.parquet"
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))
    download.run(config(path, max_images=0), tmp_path / "raw")
    row = pd.read_parquet(tmp_path / "raw" / "metadata.parquet").iloc[0]
    assert (row.artist, row.genre, row.style) == ("claude-monet", "portrait", "Impressionism")
    assert (row.width, row.height) == (40, 30)


class FlakyStream:
    """Wraps the real stream; its first iteration raises ``error`` after ``fail_after`` rows."""

    def __init__(self, stream, fail_after, error, log):
        self.stream, self.fail_after, self.error, self.log = stream, fail_after, error, log

    @property
    def features(self):
        return self.stream.features

    def state_dict(self):
        return self.stream.state_dict()

    def load_state_dict(self, state):
        self.log.append(("resumed", state is not None))
        self.stream.load_state_dict(state)

    def __iter__(self):
        for index, example in enumerate(self.stream):
            self.log.append(("row", index))
            if self.fail_after is not None and index == self.fail_after:
                raise self.error
            yield example


def flaky_open_stream(monkeypatch, fail_after, error, later_fail_after=None):
    """Patch download.open_stream: the first stream fails after ``fail_after`` rows, later ones
    after ``later_fail_after`` rows (None: they do not fail)."""
    real_open_stream = download.open_stream
    log, opens = [], []

    def open_stream(source):
        opens.append(source)
        fail = fail_after if len(opens) == 1 else later_fail_after
        return FlakyStream(real_open_stream(source), fail, error, log)

    monkeypatch.setattr(download, "open_stream", open_stream)
    return log, opens


def test_transient_error_restarts_the_stream_and_matches_an_uninterrupted_run(tmp_path, monkeypatch, reference):
    # Opening once to validate names, then the first iteration fails halfway through.
    log, opens = flaky_open_stream(monkeypatch, fail_after=10, error=ConnectionError("reset by peer"))
    summary = download.run(config("synthetic"), tmp_path / "raw", backoff_s=0)
    assert len(opens) == 2, "one retry with a fresh stream"
    assert ("resumed", True) in log, "the retry continues from the saved position"
    assert raw_state(tmp_path / "raw") == raw_state(reference[0])
    assert summary.kept == MAX_IMAGES


def test_interrupted_run_resumes_without_refetching(tmp_path, monkeypatch, reference):
    raw = tmp_path / "raw"
    with monkeypatch.context() as patch:
        flaky_open_stream(patch, fail_after=9, error=KeyboardInterrupt())
        with pytest.raises(KeyboardInterrupt):
            download.run(config("synthetic"), raw)
    assert not (raw / "metadata.parquet").exists(), "no completion marker after an interruption"
    partial_rows = (raw / ".partial" / "rows.jsonl").read_text().splitlines()
    kept_before = {p.name: p.stat().st_mtime_ns for p in (raw / "images").iterdir()}
    assert 0 < len(partial_rows) == len(kept_before) < MAX_IMAGES

    log, _ = flaky_open_stream(monkeypatch, fail_after=None, error=None)
    summary = download.run(config("synthetic"), raw)
    assert summary.resumed_from == len(kept_before)
    assert raw_state(raw) == raw_state(reference[0])
    assert not (raw / ".partial").exists()
    # Images kept before the interruption were not written again, and the stream was not reread
    # from the start: the resumed stream yields fewer rows than the uninterrupted run consumed.
    assert {name: (raw / "images" / name).stat().st_mtime_ns for name in kept_before} == kept_before
    rows_read = [index for kind, index in log if kind == "row"]
    rows_read_uninterrupted = reference[1].kept + sum(reference[1].skipped.values())
    assert 0 < len(rows_read) <= rows_read_uninterrupted - len(kept_before)


def test_persistent_errors_give_up_with_one_line_and_keep_the_partial_work(tmp_path, monkeypatch, reference):
    raw = tmp_path / "raw"
    with monkeypatch.context() as patch:
        # Some progress, then every restarted stream fails at once: no progress, so it gives up.
        flaky_open_stream(patch, fail_after=6, error=TimeoutError("read timed out"), later_fail_after=0)
        with pytest.raises(UserError) as error:
            download.run(config("synthetic"), raw, retries=2, backoff_s=0)
    message = str(error.value)
    assert "\n" not in message and "3 times" in message and "rerun" in message
    assert not (raw / "metadata.parquet").exists()
    assert len((raw / ".partial" / "rows.jsonl").read_text().splitlines()) > 0
    download.run(config("synthetic"), raw)  # the network is back
    assert raw_state(raw) == raw_state(reference[0])


def test_rerun_is_idempotent_and_drops_stale_files(tmp_path, reference):
    raw = tmp_path / "raw"
    download.run(config("synthetic"), raw)
    first = raw_state(raw)
    (raw / "images" / "0123456789abcdef.jpg").write_bytes(b"left over from other params")
    download.run(config("synthetic"), raw)
    assert raw_state(raw) == first == raw_state(reference[0])
    # Fewer images with the same params: the first rows of the same stream.
    download.run(config("synthetic", max_images=5), raw)
    table, files = raw_state(raw)
    assert table == first[0][:5] and len(files) == 5
