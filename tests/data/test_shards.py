"""Shards and manifests: deterministic writing, checked reading, no pickles, clear errors."""

from __future__ import annotations

import io
import json
import pickle
import tarfile

import numpy as np
import pytest

from herd.data.manifest import Manifest, ManifestError
from herd.data.packing import PackedRows, pack_documents, with_boundaries
from herd.data.shards import LAYOUTS, ShardError, ShardInfo, read_shard, shard_bytes, write_shard

ROW_LEN = 9


def _packed():
    docs = [with_boundaries(np.arange(i, i + 5), 500, 501) for i in range(0, 50, 5)]
    return pack_documents(docs, ROW_LEN, pad_id=501)


def _write(tmp_path, name="s.tar"):
    packed = _packed()
    path = tmp_path / name
    digest = write_shard(path, packed, first_row=10, dtype=np.dtype(np.uint16))
    return path, ShardInfo(str(path), len(packed.tokens), 10, digest), packed


def test_round_trip_and_deterministic_bytes(tmp_path):
    path, info, packed = _write(tmp_path)
    rows = read_shard(info, ROW_LEN, vocab_size=1000)
    assert [r.index for r in rows] == list(range(10, 10 + len(packed.tokens)))
    np.testing.assert_array_equal(np.stack([r.tokens for r in rows]), packed.tokens)
    np.testing.assert_array_equal(np.stack([r.document_ids for r in rows]), packed.document_ids)
    assert shard_bytes(packed, 10, np.dtype(np.uint16)) == path.read_bytes()
    assert path.read_bytes() == _tarfile_reference(packed, 10)  # exactly what tarfile itself writes
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    assert members[0].name == "000000010.tokens.npy"
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {(0, 0, 0, "", "", 0o644)}


def _tarfile_reference(packed, first_row):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i, (tokens, docs) in enumerate(zip(packed.tokens, packed.document_ids, strict=True)):
            for suffix, array in (("tokens", tokens.astype(np.uint16)), ("document_ids", docs.astype(np.int32))):
                data = io.BytesIO()
                np.save(data, array)
                info = tarfile.TarInfo(f"{first_row + i:09d}.{suffix}.npy")
                info.size, info.mode, info.uname, info.gname = len(data.getvalue()), 0o644, "", ""
                tar.addfile(info, io.BytesIO(data.getvalue()))
    return buffer.getvalue()


def test_a_flipped_byte_is_caught_by_the_checksum(tmp_path):
    path, info, _ = _write(tmp_path)
    data = bytearray(path.read_bytes())
    data[2000] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=f"shard {path} is corrupt or truncated"):
        read_shard(info, ROW_LEN, 1000)


@pytest.mark.parametrize("keep", [0.5, 4 * 1024])
def test_truncation_is_caught_without_a_checksum(tmp_path, keep):
    path, info, _ = _write(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep) if keep < 1 else int(keep)])
    unchecked = ShardInfo(info.url, info.rows, info.first_row, sha256=None)
    with pytest.raises(ShardError, match=str(path)):
        read_shard(unchecked, ROW_LEN, 1000)


def test_missing_shard_names_itself(tmp_path):
    with pytest.raises(ShardError, match=f"shard not found: {tmp_path / 'gone.tar'}"):
        read_shard(ShardInfo(str(tmp_path / "gone.tar"), 1, 0), ROW_LEN, 1000)


def test_out_of_range_tokens_are_refused(tmp_path):
    _, info, _ = _write(tmp_path)
    with pytest.raises(ShardError, match="token id 501 >= vocab size 501"):
        read_shard(info, ROW_LEN, vocab_size=501)


class _Payload:
    """Unpickling this would create a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _member(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_pickles_are_never_loaded(tmp_path):
    marker = tmp_path / "pwned"
    evil = pickle.dumps(_Payload(marker))
    buffer = io.BytesIO()
    np.save(buffer, np.array([_Payload(marker)] * ROW_LEN, dtype=object), allow_pickle=True)
    good = io.BytesIO()
    np.save(good, np.zeros(ROW_LEN, np.int32))
    with tarfile.open(tmp_path / "evil.tar", "w") as tar:
        _member(tar, "000000000.pyd", evil)  # an extra member: ignored, never decoded
        _member(tar, "000000000.tokens.npy", buffer.getvalue())  # an object array: refused
        _member(tar, "000000000.document_ids.npy", good.getvalue())
    with pytest.raises(ShardError, match="not a plain numpy array"):
        read_shard(ShardInfo(str(tmp_path / "evil.tar"), 1, 0), ROW_LEN, 1000)
    assert not marker.exists()


def _manifest(tmp_path, **tokenizer):
    data = {
        "format": "herd-packed-v1",
        "row_len": ROW_LEN,
        "tokenizer": {"path": "tokenizer", "fingerprint": "abc", "vocab_size": 640, **tokenizer},
        "sources": {
            "code": {
                "splits": {
                    "train": {"shards": [{"path": "code/train-000000.tar", "rows": 2, "first_row": 0}]}
                }
            }
        },
    }
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    return Manifest.load(tmp_path)


def test_manifest_resolves_shards_and_tokenizer(tmp_path):
    manifest = _manifest(tmp_path)
    assert manifest.shards("code", "train") == [ShardInfo(f"{tmp_path}/code/train-000000.tar", 2, 0, None)]
    assert manifest.shards("code", "val") == []
    assert manifest.tokenizer_location == f"{tmp_path}/tokenizer"
    with pytest.raises(ManifestError, match="source 'prose' is not in manifest"):
        manifest.shards("prose", "train")


def test_tokenizer_mismatches_name_both_values_and_the_manifest(tmp_path):
    manifest = _manifest(tmp_path)
    manifest.check_tokenizer(640, "abc")
    with pytest.raises(
        ManifestError, match=f"model expects 8192 but the shards in {tmp_path}/manifest.json .* of 640"
    ):
        manifest.check_tokenizer(8192)
    with pytest.raises(
        ManifestError, match=f"model expects fff but the shards in {tmp_path}/manifest.json .* with abc"
    ):
        manifest.check_tokenizer(640, "fff")


def test_missing_or_broken_manifests_are_explained(tmp_path):
    with pytest.raises(ManifestError, match=f"manifest not found: {tmp_path}/manifest.json.*herd.prepare"):
        Manifest.load(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        Manifest.load(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format": "herd-packed-v1"}')
    with pytest.raises(ManifestError, match="not a herd manifest"):
        Manifest.load(tmp_path)


def test_unigram_entropy_is_the_entropy_of_token_frequencies():
    import math

    from herd.data.shards import unigram_entropy

    assert unigram_entropy(np.array([3, 3, 7, 7], dtype=np.uint16)) == pytest.approx(math.log(2))
    assert unigram_entropy(np.array([5, 5, 5], dtype=np.uint16)) == pytest.approx(0.0)
    p = np.array([0.5, 0.25, 0.25])
    assert unigram_entropy(np.array([0, 0, 1, 2])) == pytest.approx(-(p * np.log(p)).sum())


def _manifest_listing(folder, *paths, tokenizer="tokenizer"):
    """A manifest in ``folder`` whose source 'code' lists shards at ``paths``."""
    shards = [{"path": path, "rows": 2, "first_row": 2 * i} for i, path in enumerate(paths)]
    data = {
        "format": "herd-packed-v1",
        "row_len": ROW_LEN,
        "tokenizer": {"path": tokenizer, "fingerprint": "abc", "vocab_size": 640},
        "sources": {"code": {"splits": {"train": {"shards": shards}}}},
    }
    (folder / "manifest.json").write_text(json.dumps(data))
    return data


def test_a_pipe_location_in_a_manifest_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    data = _manifest_listing(tmp_path, "code/train-000000.tar", f"pipe:touch {marker}")
    expected = (
        f"manifest {tmp_path}/manifest.json: sources.code.splits.train.shards\\[1\\].path = "
        f"'pipe:touch {marker}' is refused .*scheme 'pipe'.* Fix the manifest or re-run herd.prepare"
    )
    with pytest.raises(ManifestError, match=expected):
        Manifest.load(tmp_path)
    with pytest.raises(ManifestError, match=expected):
        Manifest(data, f"{tmp_path}/manifest.json").shards("code", "train")
    assert not marker.exists()


@pytest.mark.parametrize("location", ["PIPE:true", " pipe:true", "sftp://host/x.tar", "hf://x/y.tar", "c:x.tar"])
def test_only_plain_paths_and_allowed_url_schemes_pass(tmp_path, location):
    _manifest_listing(tmp_path, location)
    with pytest.raises(ManifestError, match=r"shards\[0\].path .* is refused"):
        Manifest.load(tmp_path)
    _manifest_listing(tmp_path, "code/train-000000.tar", tokenizer=location)
    with pytest.raises(ManifestError, match="tokenizer.path .* is refused"):
        Manifest.load(tmp_path)


def test_allowed_locations_resolve(tmp_path):
    allowed = ["s3://b/x.tar", "gs://b/x.tar", "http://h/x.tar", "HTTPS://h/x.tar", "file:///d/x.tar",
               "/abs/x.tar", "rel/x.tar"]  # fmt: skip
    _manifest_listing(tmp_path, *allowed)
    urls = [shard.url for shard in Manifest.load(tmp_path).shards("code", "train")]
    assert urls == [*allowed[:-1], f"{tmp_path}/rel/x.tar"]


def test_a_pipe_data_dir_written_by_the_user_still_works_but_is_not_extended_with_shell_text(tmp_path):
    path, info, packed = _write(tmp_path / "data", "train-000000.tar")
    _manifest_listing(tmp_path / "data", "train-000000.tar")
    manifest = Manifest.load(f"pipe:cat {tmp_path}/data/manifest.json")  # the user's own command
    (shard,) = manifest.shards("code", "train")
    assert shard.url == f"pipe:cat {tmp_path}/data/train-000000.tar"
    rows = read_shard(ShardInfo(shard.url, len(packed.tokens), 10, info.sha256), ROW_LEN, 1000)
    assert len(rows) == len(packed.tokens)
    marker = tmp_path / "pwned"
    _manifest_listing(tmp_path / "data", f"train-000000.tar; touch {marker}")
    with pytest.raises(ManifestError, match="appended to the pipe: command of data_dir"):
        Manifest.load(f"pipe:cat {tmp_path}/data/manifest.json")
    assert not marker.exists()


# --- the loss mask of dialog rows -------------------------------------------------------------------


def _masked(tmp_path, mask_of=lambda packed: packed.tokens % 2 == 0):
    packed = _packed()
    packed = PackedRows(packed.tokens, packed.document_ids, mask_of(packed))
    path = tmp_path / "masked.tar"
    digest = write_shard(path, packed, first_row=0, dtype=np.dtype(np.uint16))
    return ShardInfo(str(path), len(packed.tokens), 0, digest), packed


def test_a_loss_mask_is_a_third_member_read_back_as_bool(tmp_path):
    info, packed = _masked(tmp_path)
    rows = read_shard(info, ROW_LEN, 1000, loss_mask=True)
    np.testing.assert_array_equal(np.stack([r.loss_mask for r in rows]), packed.loss_mask)
    assert rows[0].loss_mask.dtype == np.bool_
    with tarfile.open(info.url) as tar:
        assert [m.name for m in tar.getmembers()[:3]] == [
            "000000000.tokens.npy", "000000000.document_ids.npy", "000000000.loss_mask.npy",
        ]  # fmt: skip
        mask = np.load(io.BytesIO(tar.extractfile("000000000.loss_mask.npy").read()), allow_pickle=False)
    assert mask.dtype == np.uint8
    assert all(r.loss_mask is None for r in read_shard(_write(tmp_path)[1], ROW_LEN, 1000))  # text: no mask


def test_a_loss_mask_must_match_the_layout(tmp_path):
    info, _ = _masked(tmp_path)
    with pytest.raises(ShardError, match="has a loss mask, but the manifest lists its source as text"):
        read_shard(info, ROW_LEN, 1000)
    _, text, _ = _write(tmp_path)
    with pytest.raises(ShardError, match=r"is malformed \(missing \['loss_mask.npy'\]\)"):
        read_shard(text, ROW_LEN, 1000, loss_mask=True)


def test_a_loss_mask_with_other_values_is_refused(tmp_path):
    info, _ = _masked(tmp_path, lambda packed: (packed.tokens % 3).astype(np.uint8))
    with pytest.raises(ShardError, match="loss mask values must be 0 or 1"):
        read_shard(info, ROW_LEN, 1000, loss_mask=True)


def test_the_manifest_tells_each_sources_kind_and_layout(tmp_path):
    manifest = _manifest(tmp_path)  # without kind or layout: text
    assert (manifest.source_kind("code"), manifest.has_loss_mask("code"), manifest.whole_examples("code")) == (
        "text", False, False,
    )  # fmt: skip
    manifest.data["sources"]["code"].update(kind="dialog", layout=LAYOUTS["dialog"])
    assert (manifest.source_kind("code"), manifest.has_loss_mask("code"), manifest.whole_examples("code")) == (
        "dialog", True, True,
    )  # fmt: skip
    manifest.data["sources"]["code"].update(kind="preference", layout=LAYOUTS["preference"])
    assert (manifest.source_kind("code"), manifest.has_loss_mask("code"), manifest.extras("code")) == (
        "preference", True, ("response_ids", "ranks"),
    )  # fmt: skip
    manifest.data["sources"]["code"]["layout"] = {"members": ["tokens", "document_ids", "colours"]}
    with pytest.raises(ManifestError, match=r"names the member\(s\) \['colours'\], which herd does not know"):
        manifest.extras("code")
    manifest.data["sources"]["code"]["kind"] = "image_caption"
    with pytest.raises(ManifestError, match="source 'code' .* is of kind 'image_caption'"):
        manifest.source_kind("code")


# --- the extras of preference rows -------------------------------------------------------------------

EXTRAS = ("response_ids", "ranks")


def _preference_rows():
    """Packed rows whose extras follow the documents: response id = doc % 3, rank = doc % 3 - 1."""
    packed = _packed()
    docs = packed.document_ids
    extras = {"response_ids": np.where(docs < 0, 0, docs % 3), "ranks": np.where(docs < 0, -1, docs % 3 - 1)}
    return PackedRows(packed.tokens, docs, packed.tokens % 2 == 0, extras)


def _write_rows(tmp_path, packed, name="pref.tar"):
    path = tmp_path / name
    digest = write_shard(path, packed, first_row=0, dtype=np.dtype(np.uint16))
    return ShardInfo(str(path), len(packed.tokens), 0, digest)


def test_extras_round_trip_as_members_of_their_own(tmp_path):
    packed = _preference_rows()
    info = _write_rows(tmp_path, packed)
    rows = read_shard(info, ROW_LEN, 1000, loss_mask=True, extras=EXTRAS)
    for name in EXTRAS:
        np.testing.assert_array_equal(np.stack([r.extras[name] for r in rows]), packed.extras[name])
        assert rows[0].extras[name].dtype == np.int16
    np.testing.assert_array_equal(np.stack([r.loss_mask for r in rows]), packed.loss_mask)
    with tarfile.open(info.url) as tar:
        assert [m.name for m in tar.getmembers()[:5]] == [
            "000000000.tokens.npy", "000000000.document_ids.npy", "000000000.loss_mask.npy",
            "000000000.response_ids.npy", "000000000.ranks.npy",
        ]  # fmt: skip
    assert shard_bytes(packed, 0, np.dtype(np.uint16)) == (tmp_path / "pref.tar").read_bytes()
    assert all(r.extras == {} for r in read_shard(_write(tmp_path)[1], ROW_LEN, 1000))  # text: no extras


def _replaced(info: ShardInfo, member: str, array) -> ShardInfo:
    """The shard with one member of its first row replaced by ``array`` (no checksum to catch it)."""
    with tarfile.open(info.url) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for m, data in members:
            if m.name == f"000000000.{member}":
                npy = io.BytesIO()
                np.save(npy, array)
                data = npy.getvalue()
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    path = info.url.replace(".tar", "-damaged.tar")
    with open(path, "wb") as out:
        out.write(buffer.getvalue())
    return ShardInfo(path, info.rows, info.first_row)


@pytest.mark.parametrize(
    ("member", "array", "message"),
    [
        ("response_ids.npy", np.zeros(ROW_LEN, np.float32), r"expected response_ids of 9 signed integers, got float32"),
        ("ranks.npy", np.zeros(ROW_LEN, np.uint8), r"expected ranks of 9 signed integers, got uint8"),
        ("ranks.npy", np.zeros(ROW_LEN - 1, np.int16), r"expected ranks of 9 signed integers, got int16\(8,\)"),
        ("response_ids.npy", np.full(ROW_LEN, -1, np.int16), r"response_ids values must be >= 0, found -1"),
        ("ranks.npy", np.full(ROW_LEN, -2, np.int16), r"ranks values must be >= -1, found -2"),
    ],
)
def test_a_damaged_extra_names_the_shard_and_sample(tmp_path, member, array, message):
    info = _replaced(_write_rows(tmp_path, _preference_rows()), member, array)
    with pytest.raises(ShardError, match=f"sample 000000000 in {info.url}: {message}"):
        read_shard(info, ROW_LEN, 1000, loss_mask=True, extras=EXTRAS)


def test_extras_must_match_the_layout(tmp_path):
    info = _write_rows(tmp_path, _preference_rows())
    with pytest.raises(ShardError, match=r"has the member\(s\) \['response_ids', 'ranks'\], which the manifest's"):
        read_shard(info, ROW_LEN, 1000, loss_mask=True)
    masked, _ = _masked(tmp_path)
    with pytest.raises(ShardError, match=r"is malformed \(missing \['response_ids.npy', 'ranks.npy'\]\)"):
        read_shard(masked, ROW_LEN, 1000, loss_mask=True, extras=EXTRAS)
