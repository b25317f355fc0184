"""Stage `download`: sources, class-name mapping, selection, errors, resumption. All offline."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import struct
import zlib
from pathlib import Path

import datasets
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from impressionist import download, sources
from impressionist.errors import DEMO_HINT, UserError
from impressionist.source_reads import ReadMeter
from impressionist.synthetic import write_synthetic_wikiart, write_wikiart_mirror
from impressionist.wikiart import ARTISTS

# docs/layout.md's columns of data/raw/metadata.parquet, written out (not read from the code).
LAYOUT_COLUMNS = ["id", "file", "artist", "genre", "style", "width", "height", "sha256", "source", "revision",
                  "origin"]
MAX_IMAGES = 12
SEED = 5


def params(source, **overrides):
    """The params of a download of ``source`` (its ``download`` section, with ``overrides``)."""
    cfg = {"source": str(source), "style": "Impressionism", "artists": [], "max_images": MAX_IMAGES, "seed": SEED}
    cfg.update(overrides)
    return {"download": cfg}


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
    """Everything a run leaves in data/raw: the table (without `source`, `revision` and `origin`, which
    say where the rows came from) and each file's bytes hash."""
    table = pd.read_parquet(raw_dir / "metadata.parquet")
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((raw_dir / "images").iterdir())}
    return table.drop(columns=["source", "revision", "origin"]).to_dict("records"), files


def origins(raw_dir):
    return pd.read_parquet(raw_dir / "metadata.parquet")["origin"].tolist()


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    """A single-file local mirror (read-only for the tests that share it)."""
    return synthetic_mirror(tmp_path_factory.mktemp("mirror"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted synthetic download, to compare other runs against."""
    raw = tmp_path_factory.mktemp("reference") / "raw"
    summary = download.run(params("synthetic"), raw)
    return raw, summary


def test_synthetic_source_writes_the_layout(reference):
    raw, summary = reference
    table = pd.read_parquet(raw / "metadata.parquet")
    assert list(table.columns) == LAYOUT_COLUMNS
    assert len(table) == MAX_IMAGES == summary.kept
    assert set(table["style"]) == {"Impressionism"}
    assert set(table["source"]) == {"synthetic"} and set(table["revision"]) == {""}  # not a Hub dataset
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
    # The style filter is pushed down into the Parquet reads: other styles never reach Python.
    assert summary.read_filter == "[('style', '==', 12)]" and "other style" not in summary.skipped
    assert summary.rows_scanned == summary.kept + sum(summary.skipped.values()) and summary.bytes_read > 0


def test_local_folder_and_file_read_like_the_synthetic_source(tmp_path, reference, mirror):
    expected = raw_state(reference[0])
    folder = synthetic_mirror(tmp_path / "mirror", shards=3)
    download.run(params(folder), tmp_path / "from_folder")
    assert raw_state(tmp_path / "from_folder") == expected
    assert set(pd.read_parquet(tmp_path / "from_folder" / "metadata.parquet")["source"]) == {str(folder)}
    # Each row's origin is its shard and row among the rows the pushed-down filter passes: that row of
    # that file, read with that filter, holds exactly the image kept.
    table = pd.read_parquet(tmp_path / "from_folder" / "metadata.parquet")
    shards = {}
    for origin, sha256 in zip(table["origin"], table["sha256"]):
        name, rest = origin.split(" row ")
        row, where = rest.split(" of the rows where ")
        assert where == "style == 12", origin
        if name not in shards:
            shards[name] = pq.read_table(folder / name, columns=["image"],
                                         filters=[("style", "==", 12)]).column("image").to_pylist()
        assert hashlib.sha256(shards[name][int(row)]["bytes"]).hexdigest() == sha256, origin
    assert len(shards) > 1  # the kept rows span shards, each named by its own file

    download.run(params(mirror), tmp_path / "from_file")
    assert raw_state(tmp_path / "from_file") == expected
    assert [o.replace("all.parquet", "synthetic-wikiart.parquet") for o in origins(tmp_path / "from_file")] == \
        origins(reference[0])  # a single file: the same rows of the same file layout


def test_hub_source_uses_the_same_streaming_code(tmp_path, monkeypatch, reference, mirror):
    real_load_dataset = datasets.load_dataset
    calls = []

    def fake_hub(path, *args, **kwargs):
        calls.append((path, kwargs))
        if path == "huggan/wikiart":  # stand in for the Hub with the same rows (and the same read options)
            read_options = {k: v for k, v in kwargs.items() if k in ("filters", "columns")}
            return real_load_dataset("parquet", data_files=[str(mirror)], split=kwargs["split"], streaming=True,
                                     **read_options)
        return real_load_dataset(path, *args, **kwargs)

    commit = "0123456789abcdef0123456789abcdef01234567"  # what the Hub resolves the branch to

    def fake_check(dataset_id, revision):
        calls.append(("checked", dataset_id, revision))
        return commit

    monkeypatch.setattr(sources, "check_hub_reachable", fake_check)
    monkeypatch.setattr(sources, "hub_parquet_files", lambda dataset_id, revision: [])
    monkeypatch.setattr(datasets, "load_dataset", fake_hub)
    download.run(params("huggan/wikiart", revision="main"), tmp_path / "raw")
    assert calls[0] == ("checked", "huggan/wikiart", "main")
    # The stream reads the commit the branch resolved to, and the table records it; opened once for
    # the schema, then with the style pushed down into the Parquet reads as its ClassLabel id.
    assert calls[1] == ("huggan/wikiart", {"split": "train", "streaming": True, "revision": commit})
    assert calls[2] == ("huggan/wikiart", {"split": "train", "streaming": True, "revision": commit,
                                           "filters": [("style", "==", 12)],
                                           "columns": ["image", "artist", "genre", "style"]})
    assert raw_state(tmp_path / "raw") == raw_state(reference[0])
    table = pd.read_parquet(tmp_path / "raw" / "metadata.parquet")
    assert set(table["source"]) == {"huggan/wikiart"} and set(table["revision"]) == {commit}
    # rows of the train split at that commit; the stand-in is the one-file mirror, so the same numbers
    assert [o.replace("train row", "all.parquet row") for o in table["origin"]] == \
        [o.replace("synthetic-wikiart.parquet", "all.parquet") for o in origins(reference[0])]


def test_hub_revision_is_passed_to_the_hub_and_a_missing_one_is_one_line(tmp_path, monkeypatch):
    import httpx
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import RevisionNotFoundError

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    asked = []

    class Info:
        sha = "feedface" * 5

    def dataset_info(self, repo_id, revision=None, timeout=None, **kwargs):
        asked.append((repo_id, revision))
        if revision == "v9":  # the Hub's answer for a branch, tag or commit it does not have
            url = f"https://huggingface.co/api/datasets/{repo_id}/revision/{revision}"
            raise RevisionNotFoundError("Revision Not Found", response=httpx.Response(
                404, request=httpx.Request("GET", url)))
        return Info()

    monkeypatch.setattr(HfApi, "dataset_info", dataset_info)
    assert sources.check_hub_reachable("huggan/wikiart", "v1") == Info.sha
    assert asked == [("huggan/wikiart", "v1")]
    with pytest.raises(UserError) as error:
        download.run(params("huggan/wikiart", revision="v9"), tmp_path / "raw")
    message = str(error.value)
    assert "\n" not in message and "no revision 'v9'" in message and "download.revision" in message
    assert not (tmp_path / "raw").exists()
    with pytest.raises(UserError, match="download.revision"):
        download.run(params("huggan/wikiart", revision=""), tmp_path / "raw")


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
        download.run(params("huggan/wikiart"), tmp_path / "raw")
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
        download.run(params(mirror, **{key: value}), tmp_path / "raw")
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
        download.run(params(make_source(tmp_path)), tmp_path / "raw")
    assert not (tmp_path / "raw").exists()


def test_artist_allow_list(tmp_path, reference, mirror):
    wanted = sorted(reference[1].per_artist)[:2]
    download.run(params(mirror, artists=wanted, max_images=0), tmp_path / "raw")
    table = pd.read_parquet(tmp_path / "raw" / "metadata.parquet")
    assert set(table["artist"]) == set(wanted)
    assert (table["artist"].value_counts() >= 1).all()


def test_no_matching_rows_is_an_error_that_leaves_nothing(tmp_path, mirror):
    with pytest.raises(UserError, match="no images of style Impressionism by canaletto"):
        download.run(params(mirror, artists=["canaletto"]), tmp_path / "raw")
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
    download.run(params(path, max_images=0), tmp_path / "raw")
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
    """Patch sources.open_stream: the first stream fails after ``fail_after`` rows, later ones
    after ``later_fail_after`` rows (None: they do not fail)."""
    real_open_stream = sources.open_stream
    log, opens = [], []

    def open_stream(source):
        opens.append(source)
        fail = fail_after if len(opens) == 1 else later_fail_after
        return FlakyStream(real_open_stream(source), fail, error, log)

    monkeypatch.setattr(sources, "open_stream", open_stream)
    return log, opens


def interrupted_download(monkeypatch, run_params, raw, fail_after):
    """A download interrupted (KeyboardInterrupt) after ``fail_after`` rows; returns ``raw``."""
    with monkeypatch.context() as patch:
        flaky_open_stream(patch, fail_after=fail_after, error=KeyboardInterrupt())
        with pytest.raises(KeyboardInterrupt):
            download.run(run_params, raw)
    return raw


def test_transient_error_restarts_the_stream_and_matches_an_uninterrupted_run(tmp_path, monkeypatch, reference):
    # Opening once to validate names, then the first iteration fails halfway through.
    log, opens = flaky_open_stream(monkeypatch, fail_after=10, error=ConnectionError("reset by peer"))
    summary = download.run(params("synthetic"), tmp_path / "raw", backoff_s=0)
    assert len(opens) == 2, "one retry with a fresh stream"
    assert ("resumed", True) in log, "the retry continues from the saved position"
    assert raw_state(tmp_path / "raw") == raw_state(reference[0])
    assert origins(tmp_path / "raw") == origins(reference[0])  # the row count resumes with the stream
    assert summary.kept == MAX_IMAGES


def test_interrupted_run_resumes_without_refetching(tmp_path, monkeypatch, reference):
    raw = tmp_path / "raw"
    with monkeypatch.context() as patch:
        flaky_open_stream(patch, fail_after=9, error=KeyboardInterrupt())
        with pytest.raises(KeyboardInterrupt):
            download.run(params("synthetic"), raw)
    assert not (raw / "metadata.parquet").exists(), "no completion marker after an interruption"
    partial_rows = (raw / ".partial" / "rows.jsonl").read_text().splitlines()
    kept_before = {p.name: p.stat().st_mtime_ns for p in (raw / "images").iterdir()}
    assert 0 < len(partial_rows) == len(kept_before) < MAX_IMAGES

    log, _ = flaky_open_stream(monkeypatch, fail_after=None, error=None)
    summary = download.run(params("synthetic"), raw)
    assert summary.resumed_from == len(kept_before)
    assert raw_state(raw) == raw_state(reference[0])
    assert origins(raw) == origins(reference[0])  # rows kept after the resume are counted from where it stopped
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
            download.run(params("synthetic"), raw, retries=2, backoff_s=0)
    message = str(error.value)
    assert "\n" not in message and "3 times" in message and "rerun" in message
    assert not (raw / "metadata.parquet").exists()
    assert len((raw / ".partial" / "rows.jsonl").read_text().splitlines()) > 0
    download.run(params("synthetic"), raw)  # the network is back
    assert raw_state(raw) == raw_state(reference[0])


def test_a_failed_write_to_data_raw_is_one_line_and_not_retried(tmp_path, monkeypatch):
    """Disk full or no permission on data/raw is not a network hiccup: no retries, no "reading failed"."""
    import errno

    real_open_stream, opens = sources.open_stream, []
    monkeypatch.setattr(sources, "open_stream", lambda source: opens.append(source) or real_open_stream(source))

    def disk_full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(download, "atomic_write_bytes", disk_full)
    with pytest.raises(UserError) as error:
        download.run(params("synthetic"), tmp_path / "raw", retries=3, backoff_s=0)
    message = str(error.value)
    assert "\n" not in message and "cannot write to" in message and "No space left on device" in message
    assert "times in a row" not in message and len(opens) == 1  # opened once to check names, never reopened


def png_header_only(width, height):
    """A PNG that declares width x height pixels and holds none: PIL reads only its header."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_a_decompression_bomb_is_kept_as_bin_for_the_filter_to_reject():
    assert download.image_header(png_header_only(300, 200)) == ("png", 300, 200)
    bomb = png_header_only(20000, 20000)  # 400 MP: over twice PIL's limit
    with pytest.raises(Image.DecompressionBombError):  # what PIL does with it on its own
        Image.open(io.BytesIO(bomb))
    assert download.image_header(bomb) == ("bin", 0, 0)


def test_rerun_is_idempotent_and_drops_stale_files(tmp_path, reference):
    raw = tmp_path / "raw"
    download.run(params("synthetic"), raw)
    first = raw_state(raw)
    (raw / "images" / "0123456789abcdef.jpg").write_bytes(b"left over from other params")
    download.run(params("synthetic"), raw)
    assert raw_state(raw) == first == raw_state(reference[0])
    # Fewer images with the same params: the first rows of the same stream.
    download.run(params("synthetic", max_images=5), raw)
    table, files = raw_state(raw)
    assert table == first[0][:5] and len(files) == 5


# --- a plain folder of images (the "imagefolder" source) ------------------------------------------

def mirror_rows(mirror):
    """The rows of a parquet mirror with class names: (image bytes, artist, genre, style)."""
    table = datasets.Dataset.from_parquet(str(mirror)).cast_column("image", datasets.Image(decode=False))
    names = {column: table.features[column].int2str for column in ("artist", "genre", "style")}
    return [(row["image"]["bytes"], *(names[c](row[c]) for c in ("artist", "genre", "style"))) for row in table]


def write_metadata(folder, name, records):
    """Write ``records`` (dicts) as the folder's metadata.csv, metadata.jsonl or metadata.json."""
    path = folder / name
    if name.endswith(".csv"):
        pd.DataFrame(records).to_csv(path, index=False)
    elif name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(record) + "\n" for record in records))
    else:
        path.write_text(json.dumps(records))
    return path


@pytest.fixture(scope="module")
def folder_records(tmp_path_factory, mirror):
    """The mirror's rows as image files (``row-NNN.<ext>``, in the mirror's order) plus their labels.

    Returns the folder (read-only for the tests, which copy it) and one metadata record per image.
    """
    folder = tmp_path_factory.mktemp("folder_source") / "paintings"
    folder.mkdir()
    records = []
    for index, (data, artist, genre, style) in enumerate(mirror_rows(mirror)):
        ext, _, _ = download.image_header(data)
        name = f"row-{index:03d}.{'jpg' if ext == 'bin' else ext}"  # undecodable bytes keep a .jpg name
        (folder / name).write_bytes(data)
        records.append({"file_name": name, "artist": artist, "genre": genre, "style": style})
    return folder, records


def copy_folder(folder, tmp_path):
    return Path(shutil.copytree(folder, tmp_path / folder.name))


@pytest.mark.parametrize("metadata_name", ["metadata.csv", "metadata.jsonl", "metadata.json"])
def test_image_folder_with_metadata_reads_like_the_parquet_mirror(tmp_path, folder_records, reference,
                                                                  metadata_name):
    folder, records = folder_records
    folder = copy_folder(folder, tmp_path)
    write_metadata(folder, metadata_name, records)
    summary = download.run(params(folder), tmp_path / "raw")
    # Same rows, ids, labels, sizes and image bytes as the parquet route (the reference), in the same order.
    assert raw_state(tmp_path / "raw") == raw_state(reference[0])
    table = pd.read_parquet(tmp_path / "raw" / "metadata.parquet")
    assert list(table.columns) == LAYOUT_COLUMNS and set(table["source"]) == {str(folder)}
    assert summary.per_artist == reference[1].per_artist
    # A folder has no Parquet reader to push the style filter into: Python skips the other styles.
    assert summary.read_filter is None and summary.skipped.pop("other style") > 0
    assert summary.skipped == reference[1].skipped
    # the user's own file names, relative to the folder: each names the file whose bytes were kept
    assert all(o.startswith("row-") and "/" not in o for o in table["origin"])
    for origin, sha256 in zip(table["origin"], table["sha256"]):
        assert hashlib.sha256((folder / origin).read_bytes()).hexdigest() == sha256, origin


def test_image_folder_without_metadata_is_the_requested_style(tmp_path, folder_records):
    folder, records = folder_records
    source = tmp_path / "mine"
    (source / "nested" / "deeper").mkdir(parents=True)
    (source / ".thumbnails").mkdir()
    # name -> row of the fixture; "[1890]" would be a glob pattern if passed to datasets unescaped
    chosen = {"a.jpg": 1, "nested/B [1890].PNG": 3, "nested/deeper/c*.webp": 4}
    for name, row in chosen.items():
        (source / name).write_bytes((folder / records[row]["file_name"]).read_bytes())
    (source / ".thumbnails" / "a.jpg").write_bytes((folder / records[6]["file_name"]).read_bytes())
    (source / "notes.md").write_text("not an image")

    summary = download.run(params(source, style="Post_Impressionism", max_images=0), tmp_path / "raw")
    table = pd.read_parquet(tmp_path / "raw" / "metadata.parquet")
    expected_ids = sorted(hashlib.sha256((source / name).read_bytes()).hexdigest()[:16] for name in chosen)
    assert sorted(table["id"]) == expected_ids, "every image, recursively, and nothing hidden"
    assert set(table["artist"]) == {"Unknown Artist"} and set(table["genre"]) == {"Unknown Genre"}
    assert set(table["style"]) == {"Post_Impressionism"}
    assert summary.kept == 3 and summary.skipped == {}

    # Without metadata no artist can be chosen but "Unknown Artist"; the error says why.
    with pytest.raises(UserError) as error:
        download.run(params(source, artists=["claude-monet"]), tmp_path / "raw2")
    message = str(error.value)
    assert "\n" not in message and "'claude-monet'" in message and "Unknown Artist" in message
    assert "no metadata.csv" in message
    assert not (tmp_path / "raw2").exists()


def test_partial_metadata_falls_back_to_the_defaults(tmp_path, folder_records):
    folder, records = folder_records
    source = tmp_path / "mine"
    source.mkdir()
    for row in range(4):
        (source / records[row]["file_name"]).write_bytes((folder / records[row]["file_name"]).read_bytes())
    (source / "metadata.csv").write_text(
        "file_name,artist,genre,style,title\n"
        f"{records[0]['file_name']},claude-monet,landscape,Impressionism,Haystacks\n"
        f"{records[1]['file_name']},,portrait,\n"                 # empty cells: the defaults
        f"{records[2]['file_name']},rembrandt,portrait,Baroque,\n"  # another style: skipped
    )                                                             # row 3 unlisted: the defaults
    summary = download.run(params(source, max_images=0), tmp_path / "raw")
    table = pd.read_parquet(tmp_path / "raw" / "metadata.parquet")
    by_id = {row.id: (row.artist, row.genre, row.style) for row in table.itertuples()}

    def image_id(row):
        return hashlib.sha256((source / records[row]["file_name"]).read_bytes()).hexdigest()[:16]

    assert by_id == {
        image_id(0): ("claude-monet", "landscape", "Impressionism"),
        image_id(1): ("Unknown Artist", "portrait", "Impressionism"),
        image_id(3): ("Unknown Artist", "Unknown Genre", "Impressionism"),
    }
    assert summary.skipped == {"other style": 1}


def test_image_folder_artists_are_validated_against_its_metadata(tmp_path, folder_records):
    folder, records = folder_records
    folder = copy_folder(folder, tmp_path)
    metadata = write_metadata(folder, "metadata.jsonl", records)
    impressionists = sorted({r["artist"] for r in records if r["style"] == "Impressionism"})
    with pytest.raises(UserError) as error:
        download.run(params(folder, artists=[impressionists[0], "claude-monnet"]), tmp_path / "raw")
    message = str(error.value)
    assert "\n" not in message and "'claude-monnet'" in message and str(metadata) in message
    assert all(name in message for name in impressionists) and repr(impressionists[0]) not in message
    assert not (tmp_path / "raw").exists()

    download.run(params(folder, artists=impressionists[:1], max_images=0), tmp_path / "raw")
    table = pd.read_parquet(tmp_path / "raw" / "metadata.parquet")
    expected = [r for r in records if r["artist"] == impressionists[0] and r["style"] == "Impressionism"]
    # every image of that artist, once: ids are the first 16 hex digits of the bytes' sha256
    expected_ids = {hashlib.sha256((folder / r["file_name"]).read_bytes()).hexdigest()[:16] for r in expected}
    assert len(expected_ids) >= 2 and sorted(table["id"]) == sorted(expected_ids)
    assert set(table["artist"]) == {impressionists[0]}


def test_sidecar_captions_follow_the_renamed_images(tmp_path, folder_records):
    from impressionist.caption import read_sidecar

    folder, records = folder_records
    source = tmp_path / "mine"
    source.mkdir()
    names = [records[row]["file_name"] for row in (0, 1)]
    for name in names:
        (source / name).write_bytes((folder / name).read_bytes())
    caption = "impr3ssionism, a  haystack at dusk\nby Claude Monet ✓\n"
    (source / names[0]).with_suffix(".txt").write_text(caption, encoding="utf-8")
    raw = tmp_path / "raw"
    download.run(params(source, max_images=0), raw)

    ids = [hashlib.sha256((source / name).read_bytes()).hexdigest()[:16] for name in names]
    assert (raw / "images" / f"{ids[0]}.txt").read_text(encoding="utf-8") == caption
    assert not (raw / "images" / f"{ids[1]}.txt").exists()
    assert read_sidecar(raw / "images", ids[0]) == "impr3ssionism, a haystack at dusk by Claude Monet ✓"
    assert not list((raw / "images").glob(".*")), "no temporary files left behind"

    # The sidecar is removed from the source: a rerun must not keep the stale copy.
    (source / names[0]).with_suffix(".txt").unlink()
    download.run(params(source, max_images=0), raw)
    assert sorted(p.suffix for p in (raw / "images").iterdir()) == [".jpg", ".jpg"]


def test_image_folder_resumes_after_a_transient_error(tmp_path, monkeypatch, folder_records, reference):
    folder, records = folder_records
    folder = copy_folder(folder, tmp_path)
    write_metadata(folder, "metadata.csv", records)
    log, opens = flaky_open_stream(monkeypatch, fail_after=8, error=OSError("stale file handle"))
    download.run(params(folder), tmp_path / "raw", backoff_s=0)
    assert len(opens) == 2 and ("resumed", True) in log
    assert raw_state(tmp_path / "raw") == raw_state(reference[0])


def test_folder_without_images_or_parquet_is_one_clear_error(tmp_path):
    source = tmp_path / "notes"
    source.mkdir()
    (source / "readme.md").write_text("no paintings here")
    (source / "metadata.csv").write_text("file_name,artist\n")
    with pytest.raises(UserError) as error:
        download.run(params(source), tmp_path / "raw")
    message = str(error.value)
    assert "\n" not in message and "no .parquet files and no images" in message and "jpg" in message
    assert not (tmp_path / "raw").exists()


@pytest.mark.parametrize("name, text, expected", [
    ("metadata.csv", 'file_name,artist\n"row-000.jpg,claude-monet\n', "cannot read the metadata file"),
    ("metadata.jsonl", '{"file_name": "row-000.jpg"}\n{"file_name": \n', "line 2"),
    ("metadata.json", '{"file_name": "row-000.jpg"}', "list of objects"),
    ("metadata.csv", "name,artist\nrow-000.jpg,claude-monet\n", "no file_name column"),
    ("metadata.jsonl", '{"file_name": "row-000.jpg", "artist": 7}\n', "artist=7 in row 1"),
    ("metadata.csv", "file_name,artist\nrow-000.jpg,a\nmissing.jpg,b\n../row-001.jpg,c\n",
     "2 file_name(s) that are not images"),
])
def test_unreadable_metadata_is_one_error_naming_the_file_and_columns(tmp_path, folder_records, name, text,
                                                                       expected):
    source = tmp_path / "mine"
    source.mkdir()
    for row in range(2):
        (source / f"row-{row:03d}.jpg").write_bytes((folder_records[0] / f"row-{row:03d}.jpg").read_bytes())
    (source / name).write_text(text)
    with pytest.raises(UserError) as error:
        download.run(params(source), tmp_path / "raw")
    message = str(error.value)
    assert "\n" not in message and expected in message and str(source.resolve() / name) in message
    if "not images" not in expected:
        assert "file_name column" in message and "artist, genre and style" in message
    assert not (tmp_path / "raw").exists()


def test_two_metadata_files_are_ambiguous(tmp_path, folder_records):
    folder, records = folder_records
    folder = copy_folder(folder, tmp_path)
    write_metadata(folder, "metadata.csv", records)
    write_metadata(folder, "metadata.jsonl", records)
    with pytest.raises(UserError, match="metadata.csv and metadata.jsonl; keep one"):
        download.run(params(folder), tmp_path / "raw")
    assert not (tmp_path / "raw").exists()


def test_edited_folder_metadata_restarts_an_interrupted_download(tmp_path, monkeypatch, folder_records):
    folder, records = folder_records
    folder = copy_folder(folder, tmp_path)
    write_metadata(folder, "metadata.csv", records)
    raw = tmp_path / "raw"
    with monkeypatch.context() as patch:
        flaky_open_stream(patch, fail_after=9, error=KeyboardInterrupt())
        with pytest.raises(KeyboardInterrupt):
            download.run(params(folder), raw)
    assert (raw / ".partial" / "rows.jsonl").read_text().strip(), "some rows were kept before the interruption"

    renamed = [dict(r, artist="monet-renamed") if r["artist"] == "claude-monet" else r for r in records]
    write_metadata(folder, "metadata.csv", renamed)
    summary = download.run(params(folder), raw)
    assert summary.resumed_from == 0, "rows kept under the old labels are not reused"
    table = pd.read_parquet(raw / "metadata.parquet")
    assert "claude-monet" not in set(table["artist"]) and "monet-renamed" in set(table["artist"])


# --- the style filter pushed down into the Parquet reads -----------------------------------------

ORDERED_ROWS = 160


@pytest.fixture(scope="module")
def ordered_mirrors(tmp_path_factory):
    """Two local mirrors with 16% Impressionism: rows grouped by style, and shuffled (read-only)."""
    root = tmp_path_factory.mktemp("ordered")
    return {order: write_wikiart_mirror(root / order, ORDERED_ROWS, order)[0].parent
            for order in ("by_style", "shuffled")}


def mirror_table(folder):
    return pd.concat([pd.read_parquet(path) for path in sorted(folder.glob("*.parquet"))], ignore_index=True)


def test_pushdown_keeps_the_same_rows_on_a_shuffled_mirror(tmp_path, ordered_mirrors):
    mirror = ordered_mirrors["shuffled"]
    table = mirror_table(mirror)
    impressionism = table[table["style"] == 12]
    two_ids = sorted(impressionism["artist"].value_counts().index[:2].tolist())
    two_artists = [ARTISTS[i] for i in two_ids]
    for overrides in ({}, {"artists": two_artists}):
        runs = {}
        for pushdown in (True, False):
            raw = tmp_path / f"{len(overrides)}-{pushdown}"
            runs[pushdown] = download.run(params(mirror, max_images=0, **overrides), raw, pushdown=pushdown)
        assert raw_state(tmp_path / f"{len(overrides)}-True") == raw_state(tmp_path / f"{len(overrides)}-False")
        pushed, unpushed = runs[True], runs[False]
        assert unpushed.read_filter is None and unpushed.rows_scanned == ORDERED_ROWS
        assert unpushed.skipped["other style"] > 0
        # Pushed down, only the wanted rows reach the Python check.
        assert pushed.rows_scanned == pushed.kept < ORDERED_ROWS and pushed.skipped == {}
    assert pushed.read_filter == f"[('style', '==', 12), ('artist', 'in', {two_ids})]"
    assert set(pd.read_parquet(tmp_path / "1-True" / "metadata.parquet")["artist"]) == set(two_artists)


def test_pushdown_reads_about_the_wanted_share_of_a_style_grouped_mirror(tmp_path, ordered_mirrors):
    mirror = ordered_mirrors["by_style"]
    files_bytes = sum(path.stat().st_size for path in mirror.glob("*.parquet"))
    table = mirror_table(mirror)
    wanted_image_bytes = sum(len(cell["bytes"]) for cell in table[table["style"] == 12]["image"])
    pushed = download.run(params(mirror, max_images=0), tmp_path / "pushed")
    unpushed = download.run(params(mirror, max_images=0), tmp_path / "unpushed", pushdown=False)
    assert raw_state(tmp_path / "pushed") == raw_state(tmp_path / "unpushed")
    # Without pushdown every byte of every shard is read (the footers twice); with it, the row
    # groups holding Impressionism (16% of the rows, 4 groups of 8 rows: 20%) and the footers.
    assert unpushed.bytes_read >= files_bytes
    share = pushed.bytes_read / unpushed.bytes_read
    print(f"bytes read with pushdown: {pushed.bytes_read} of {unpushed.bytes_read} ({share:.0%}); "
          f"Impressionism is {pushed.kept / ORDERED_ROWS:.0%} of the rows")
    assert wanted_image_bytes < pushed.bytes_read < 0.3 * unpushed.bytes_read


def test_pushdown_resumes_an_interrupted_download_of_a_style_grouped_mirror(tmp_path, monkeypatch, ordered_mirrors):
    mirror = ordered_mirrors["by_style"]
    download.run(params(mirror, max_images=0), tmp_path / "uninterrupted")
    raw = interrupted_download(monkeypatch, params(mirror, max_images=0), tmp_path / "raw", fail_after=7)
    kept_before = len((raw / ".partial" / "rows.jsonl").read_text().splitlines())
    assert kept_before == 7
    log, _ = flaky_open_stream(monkeypatch, fail_after=None, error=None)
    summary = download.run(params(mirror, max_images=0), raw)
    assert summary.resumed_from == kept_before and summary.rows_scanned == summary.kept - kept_before
    assert raw_state(raw) == raw_state(tmp_path / "uninterrupted")
    assert len([kind for kind, _ in log if kind == "row"]) == summary.kept - kept_before, "no row read twice"


def test_transfer_metrics_are_written(tmp_path, ordered_mirrors):
    mirror = ordered_mirrors["by_style"]
    summary = download.run(params(mirror, max_images=10), tmp_path / "raw", metrics_path=tmp_path / "m" / "d.json")
    metrics = json.loads((tmp_path / "m" / "d.json").read_text())
    assert metrics == {"images": 10, "resumed_from": 0, "rows_scanned": summary.rows_scanned, "rows_kept": 10,
                       "bytes_read": summary.bytes_read, "seconds": round(summary.seconds, 3),
                       "pushdown": True}
    assert 0 < metrics["bytes_read"] and metrics["rows_scanned"] == 10


def test_read_meter_position_follows_the_files_in_order():
    meter = ReadMeter([("data/a.parquet", 100), ("data/b.parquet", 50)])
    assert meter.total == 150 and meter.position() == 0
    meter.opened("hf://datasets/x/y@abc/data/a.parquet")
    meter.add(30)
    assert meter.position() == 30
    meter.opened("hf://datasets/x/y@abc/data/b.parquet")  # a skips the rest of a: the position jumps
    meter.add(10)
    assert meter.position() == 110
    meter.add(80)  # read more than the file (footer read twice): the position stays within it
    assert meter.position() == 150 and meter.bytes_read == 120 and meter.files_opened == 2


def test_hub_parquet_files_lists_the_shards_in_name_order_or_nothing(monkeypatch):
    from huggingface_hub import HfApi, constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    class Sibling:
        def __init__(self, rfilename, size):
            self.rfilename, self.size = rfilename, size

    class Info:
        siblings = [Sibling("data/train-00001-of-00002.parquet", 20), Sibling("README.md", 5),
                    Sibling("data/train-00000-of-00002.parquet", 10)]

    asked = []
    monkeypatch.setattr(HfApi, "dataset_info", lambda self, repo_id, **kwargs: asked.append(kwargs) or Info())
    assert sources.hub_parquet_files("huggan/wikiart", "abc") == [
        ("data/train-00000-of-00002.parquet", 10), ("data/train-00001-of-00002.parquet", 20)]
    assert asked[0]["revision"] == "abc" and asked[0]["files_metadata"] and asked[0]["timeout"]

    def no_network(self, repo_id, **kwargs):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(HfApi, "dataset_info", no_network)
    assert sources.hub_parquet_files("huggan/wikiart", "abc") == []  # the download runs without an ETA


def test_progress_bar_counts_the_source_bytes_passed_and_shows_the_bytes_read(tmp_path, monkeypatch,
                                                                              ordered_mirrors):
    from tqdm import tqdm

    bars = []

    class RecordingBar(tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "disable": False, "file": io.StringIO()})
            bars.append(self)
            self.seen = []

        def update(self, n=1):
            super().update(n)
            self.seen.append(self.n)

    monkeypatch.setattr(download, "tqdm", RecordingBar)
    mirror = ordered_mirrors["by_style"]
    summary = download.run(params(mirror, max_images=0), tmp_path / "raw")
    bar = bars[-1]
    # Without max_images: bytes of the source passed, out of the mirror's size (an ETA is possible).
    assert bar.unit == "B" and bar.total == sum(p.stat().st_size for p in mirror.glob("*.parquet"))
    assert bar.n == bar.total and "read " in bar.postfix and f"kept {summary.kept}" in bar.postfix
    assert any(0 < n < bar.total for n in bar.seen) and bar.seen == sorted(bar.seen), "it moves forward as it reads"
    bars.clear()
    download.run(params(mirror, max_images=5), tmp_path / "raw5")
    assert bars[-1].unit == "img" and bars[-1].total == 5 and bars[-1].n == 5


def folder_with_a_copy_and_an_empty_file(folder, records, root):
    """Two paintings, a byte-identical copy of the first under another name and an empty file."""
    source = root / "mine"
    (source / "n").mkdir(parents=True)
    first = (folder / records[0]["file_name"]).read_bytes()
    (source / "a.jpg").write_bytes(first)
    (source / "b.jpg").write_bytes((folder / records[1]["file_name"]).read_bytes())
    (source / "n" / "copy of a.jpg").write_bytes(first)
    (source / "n" / "empty.png").write_bytes(b"")
    return source, hashlib.sha256(first).hexdigest()[:16]


def test_every_dropped_file_is_named_with_its_origin_and_reason(tmp_path, folder_records, capsys):
    source, first_id = folder_with_a_copy_and_an_empty_file(*folder_records, tmp_path)
    summary = download.run(params(source, max_images=0), tmp_path / "raw")
    assert summary.kept == 2 and summary.skipped == {"duplicate": 1, "no image bytes": 1}
    dropped = pd.read_csv(tmp_path / "raw" / "dropped.csv", keep_default_na=False)
    assert dropped.to_dict("records") == [
        {"origin": "n/copy of a.jpg", "reason": "duplicate", "same_bytes_as": first_id,
         "same_bytes_as_origin": "a.jpg"},
        {"origin": "n/empty.png", "reason": "no image bytes", "same_bytes_as": "", "same_bytes_as_origin": ""},
    ]
    assert str(tmp_path / "raw" / "dropped.csv") in capsys.readouterr().out  # the summary says where


def test_dropped_list_survives_an_interruption(tmp_path, monkeypatch, folder_records):
    source, _ = folder_with_a_copy_and_an_empty_file(*folder_records, tmp_path)
    download.run(params(source, max_images=0), tmp_path / "uninterrupted")
    # rows in name order: a.jpg, b.jpg, n/copy of a.jpg, then the interruption
    raw = interrupted_download(monkeypatch, params(source, max_images=0), tmp_path / "raw", fail_after=3)
    assert (raw / ".partial" / "dropped.jsonl").read_text().count("copy of a.jpg") == 1
    download.run(params(source, max_images=0), raw)
    assert (raw / "dropped.csv").read_bytes() == (tmp_path / "uninterrupted" / "dropped.csv").read_bytes()
    # A source with nothing dropped still writes the (empty) list: its absence would be ambiguous.
    clean = tmp_path / "clean"
    clean.mkdir()
    (clean / "a.jpg").write_bytes((source / "a.jpg").read_bytes())
    download.run(params(clean, max_images=0), tmp_path / "raw_clean")
    assert pd.read_csv(tmp_path / "raw_clean" / "dropped.csv").empty


def test_a_row_read_again_after_a_crash_is_not_listed_as_its_own_copy(tmp_path, monkeypatch, folder_records):
    source, _ = folder_with_a_copy_and_an_empty_file(*folder_records, tmp_path)
    raw = tmp_path / "raw"
    real_save_state = download.Progress.save_state

    def crash_once_the_first_row_is_kept(self, *args):
        if len(self.rows) == 1:  # a.jpg is recorded, its stream position not yet saved
            raise KeyboardInterrupt
        real_save_state(self, *args)

    with monkeypatch.context() as patch:
        patch.setattr(download.Progress, "save_state", crash_once_the_first_row_is_kept)
        with pytest.raises(KeyboardInterrupt):
            download.run(params(source, max_images=0), raw)
    summary = download.run(params(source, max_images=0), raw)  # reads a.jpg again
    assert summary.kept == 2 and summary.skipped == {"duplicate": 1, "no image bytes": 1}
    assert pd.read_csv(raw / "dropped.csv")["origin"].tolist() == ["n/copy of a.jpg", "n/empty.png"]
