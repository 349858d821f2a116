"""`edit` and `channels` on a latent dataset made by `latentray invert`, chained in one `latentray run` file."""

import io

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from conftest import read_parts, tensor
from corpus import face_corpus
from models.default_generator import load_default_generator
from ops.edit import channel_std
from pipelines.cli import main


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    root = tmp_path_factory.mktemp("latent_stages")
    photos = root / "photos"
    photos.mkdir()
    for name in ("face.png", "two_faces.jpg", "ok.jpg"):  # ok.jpg has no face: a failed source row
        (photos / name).write_bytes(face_corpus()[name][0])
    G = load_default_generator()
    np.save(root / "direction.npy", np.random.default_rng(0).normal(size=G.style_dim).astype(np.float32))
    (root / "edits.yaml").write_text(f"""
- {{kind: direction, name: dir, path: {root / 'direction.npy'}, strengths: [0, 2], layers: [0, 4]}}
- {{kind: channel, layer: {G.style_layers[3].name}, channel: 5, strengths: [-10, 10]}}
- {{kind: interpolate, other: two_faces.jpg, strengths: [0, 1]}}
- {{kind: mix, other: two_faces.jpg, strengths: [4]}}
- {{kind: arithmetic, a: face.png, b: two_faces.jpg, strengths: [1]}}
- {{kind: geometric, shift: [8, 0], strengths: [1]}}
""")
    (root / "geometric.yaml").write_text("- {kind: geometric, shift: [8, 0], degrees: 5, strengths: [0, 1]}\n")
    (root / "channel.yaml").write_text(f"- {{kind: channel, layer: {G.style_layers[3].name}, channel: 5, "
                                       "strengths: [10]}\n")
    (root / "exemplars.txt").write_text("face.png\ntwo_faces.jpg\n")
    (root / "pipeline.yaml").write_text(f"""
stages:
  - {{stage: invert, input: {photos}, output: {root / 'latents'}, spaces: "wplus,s,fwplus", steps: 3,
     lpips-net: alex, lpips-backbone: random}}
  - {{stage: edit, input: {root / 'latents'}, output: {root / 'edits'}, edits: {root / 'edits.yaml'}}}
  - {{stage: edit, input: {root / 'latents'}, output: {root / 'moved'}, edits: {root / 'geometric.yaml'},
     space: fwplus}}
  - {{stage: channels, input: {root / 'latents'}, output: {root / 'channels'}, exemplars: {root / 'exemplars.txt'},
     local-sample: 2, grid: 8}}
  - {{stage: edit, input: {root / 'latents'}, output: {root / 'channel_edit'}, edits: {root / 'channel.yaml'},
     channel-stats: {root / 'channels'}}}
""")
    assert main(["run", str(root / "pipeline.yaml")]) == 0
    return root, G


def test_edit_rows_and_defining_properties(stages):
    root, G = stages
    latents, edits = read_parts(root / "latents"), read_parts(root / "edits")
    source = {k: i for i, k in enumerate(latents.column("key").to_pylist())}
    rows = {k: i for i, k in enumerate(edits.column("key").to_pylist())}
    assert len(rows) == 3 * 9  # 3 sources x 9 (edit, strength) pairs, each exactly once
    status = edits.column("status").to_pylist()
    code = edits.column("error_code").to_pylist()
    # a source row that failed keeps its first failure in every edit row made from it
    assert {(status[i], code[i]) for k, i in rows.items() if k.startswith("ok.jpg|")} == {("failed", "no_face")}
    assert set(edits.column("source_key").to_pylist()) == set(source)
    assert status[rows["face.png|geometric|1"]] == "skipped" and code[rows["face.png|geometric|1"]] == "not_applicable"
    wplus, styles = tensor(edits, "wplus"), tensor(edits, "styles")
    src_w, other_w = tensor(latents, "wplus")[source["face.png"]], tensor(latents, "wplus")[source["two_faces.jpg"]]
    np.testing.assert_array_equal(wplus[rows["face.png|dir|0"]], src_w)  # strength 0 is the source, exactly
    moved = wplus[rows["face.png|dir|2"]] - src_w
    d = np.load(root / "direction.npy")
    np.testing.assert_allclose(moved[:4], np.broadcast_to(2 * d, (4, G.style_dim)), atol=1e-5)
    assert np.all(moved[4:] == 0)
    # channel edit: S of the source plus alpha * std at one index, NaN W+ (S edits have no W+ preimage)
    with torch.no_grad():
        s_src = G.styles_to_vector(G.styles(torch.from_numpy(src_w[None])))[0].numpy()
    index = G.style_layers[3].offset + 5
    delta = styles[rows["face.png|channel|10"]] - s_src
    assert np.flatnonzero(np.abs(delta) > 1e-5).tolist() == [index]
    np.testing.assert_allclose(delta[index], 10 * channel_std(G)[index].item(), rtol=1e-4)
    assert np.isnan(wplus[rows["face.png|channel|10"]]).all()
    np.testing.assert_allclose(wplus[rows["face.png|interpolate|1"]], other_w, atol=1e-6)
    np.testing.assert_array_equal(wplus[rows["face.png|interpolate|0"]], src_w)
    mixed = wplus[rows["face.png|mix|4"]]
    np.testing.assert_array_equal(mixed[:4], src_w[:4])
    np.testing.assert_allclose(wplus[rows["face.png|arithmetic|1"]], other_w, atol=1e-6)  # a + (b - a) = b
    np.testing.assert_array_equal(mixed[4:], other_w[4:])
    # the stored PNG is the rendering of the stored latent
    png = np.asarray(Image.open(io.BytesIO(edits.column("image_png")[rows["face.png|dir|2"]].as_py())))
    with torch.no_grad():
        expected = ((G.synthesis(torch.from_numpy(wplus[rows["face.png|dir|2"]][None])) + 1) * 127.5)
    assert np.abs(png.astype(float) - expected.clamp(0, 255)[0].permute(1, 2, 0).numpy()).max() <= 1
    assert (root / "edits" / "previews" / "edit-dir.png").exists()


def test_geometric_edit_of_fwplus_latents_moves_the_base_code(stages):
    root, G = stages
    latents, moved = read_parts(root / "latents"), read_parts(root / "moved")
    keys = moved.column("key").to_pylist()
    i0, i1 = keys.index("face.png|geometric|0"), keys.index("face.png|geometric|1")
    src = latents.column("key").to_pylist().index("face.png")
    base = tensor(moved, "fwplus_base_code")
    np.testing.assert_array_equal(base[i0], tensor(latents, "fwplus_base_code")[src])
    assert not np.allclose(base[i1], base[i0])
    np.testing.assert_array_equal(tensor(moved, "fwplus_wplus")[i1], tensor(latents, "fwplus_wplus")[src])


def test_channel_statistics_of_the_population(stages):
    root, G = stages
    latents = read_parts(root / "latents")
    ok = np.array([s == "ok" for s in latents.column("status").to_pylist()])
    s = tensor(latents, "styles")[ok].astype(np.float64)
    pop = pq.read_table(root / "channels" / "population_stats.parquet").to_pydict()
    np.testing.assert_allclose(pop["mean"], s.mean(0), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(pop["std"], s.std(0), rtol=1e-6, atol=1e-9)
    assert set(pop["count"]) == {2} and pop["index"] == list(range(G.n_styles))
    attr = pq.read_table(root / "channels" / "attribute_channels.parquet").to_pydict()
    assert {"layer", "channel", "index", "theta", "is_torgb"} <= set(attr)
    assert np.all(np.diff(np.array(attr["theta"])[np.isfinite(attr["theta"])]) <= 0)
    local = pq.read_table(root / "channels" / "local_channels.parquet").to_pydict()
    assert len(local["index"]) == sum(l.width for l in G.style_layers if not l.is_torgb)
    freq = np.stack([local[f"freq_{r}"] for r in ("background", "face", "brows", "eyes", "nose", "mouth")], 1)
    assert np.all((freq >= 0) & (freq <= 1))
    assert (root / "channels" / "previews" / "attribute_channels.png").exists()


def test_channel_edits_can_take_the_std_of_a_channels_output(stages):
    root, G = stages
    pop = pq.read_table(root / "channels" / "population_stats.parquet").to_pydict()
    index = G.style_layers[3].offset + 5
    edited, plain = read_parts(root / "channel_edit"), read_parts(root / "edits")
    k = edited.column("key").to_pylist().index("face.png|channel|10")
    base = plain.column("key").to_pylist().index("face.png|channel|-10")
    s_plus, s_minus = tensor(edited, "styles")[k], tensor(plain, "styles")[base]
    source = s_minus[index] + 10 * channel_std(G)[index].item()  # undo the -10 std edit
    np.testing.assert_allclose(s_plus[index] - source, 10 * pop["std"][index], rtol=1e-4, atol=1e-6)


def channels_stage(root, **config):
    """A ChannelsStage prepared on the latents output, as the runtime prepares it (no Ray)."""
    from ops.channels import ChannelsConfig, ChannelsStage
    from pipelines.sources import StageOutput

    stage = ChannelsStage(ChannelsConfig(**config))
    plan = stage.prepare(StageOutput(str(root / "latents")).context())
    stage.bind(plan)
    return stage, plan


def test_population_of_w_plus_latents_goes_through_the_generator(stages):
    """The channels aggregate on W+ rows (S computed by the generator), fed in batches of 1 and 2 in either order,
    equals numpy's statistics of S: partial/merge are exact whatever the batching."""
    import dataclasses

    from pipelines.index import read_dataset
    from pipelines.io import columns_of

    from ops.stage import Resources

    root, G = stages
    stage, plan = channels_stage(root)
    # the dataset also holds S; take the W+ path (through the generator) on purpose
    stage.setup(dataclasses.replace(plan, prepared={**plan.prepared, "column": "wplus"},
                                    resources=Resources(num_gpus=1)), "cpu")
    table = columns_of(read_dataset(str(root / "latents"), ["key", "status", "wplus"]))
    ok = table["status"] == "ok"
    with torch.no_grad():
        s = G.styles_to_vector(G.styles(torch.from_numpy(table["wplus"][ok]))).double().numpy()
    batches = [{c: v[i:i + 1] for c, v in table.items()} for i in range(len(ok))]
    states = [stage.partial(b) for b in batches]
    merged = states[-1]
    for state in reversed(states[:-1]):
        merged = stage.merge(merged, state)
    whole = stage.partial(table)
    for state in (merged, whole):
        pop = stage.finish(state).tables["population_stats"]
        assert set(pop["count"]) == {2}
        np.testing.assert_allclose(pop["mean"], s.mean(0), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(pop["std"], s.std(0), rtol=1e-4, atol=1e-6)
    assert dataclasses.asdict(stage.config)["exemplars"] == ""


def test_exemplars_can_be_chosen_by_a_condition_on_a_column(stages):
    root, _ = stages
    assert channels_stage(root, exemplar_filter="n_faces == 2")[0].exemplar_keys == {"two_faces.jpg"}
    assert channels_stage(root, exemplar_filter="wplus_psnr > 0")[0].exemplar_keys == {"face.png", "two_faces.jpg"}
    with pytest.raises(ValueError, match="op in"):
        channels_stage(root, exemplar_filter="n_faces ~ 2")


def test_rerunning_the_pipeline_file_does_nothing(stages, capsys):
    """Every stage of the run file resumes to nothing left: no part rewritten, the aggregate not recomputed."""
    import json

    root, _ = stages
    outputs = ("latents", "edits", "moved", "channels", "channel_edit")
    before = {p: p.stat().st_mtime_ns for o in outputs for p in (root / o).glob("*.parquet")}
    capsys.readouterr()
    assert main(["run", str(root / "pipeline.yaml")]) == 0
    assert {p: p.stat().st_mtime_ns for o in outputs for p in (root / o).glob("*.parquet")} == before
    assert capsys.readouterr().out.count("no new rows") == 4
    assert json.loads((root / "channels" / "stats.json").read_text())["population"] == 2


def test_edited_faces_are_pasted_back_into_their_photos(stages):
    """paste of an edit output with --photos: each edit row finds its photo through source_key; the strength-0 edit
    (the reconstruction) and the moved one change the photo only where the face is, differently."""
    from ops.images import decode_png

    root, _ = stages
    assert main(["paste", "--input", str(root / "edits"), "--photos", str(root / "latents"), "--output",
                 str(root / "pasted")]) == 0
    table = read_parts(root / "pasted")
    rows = dict(zip(table.column("key").to_pylist(), range(len(table))))
    assert len(rows) == 27 and table.column("error_code").to_pylist()[rows["ok.jpg|dir|0"]] == "no_face"
    original = np.asarray(Image.open(io.BytesIO(face_corpus()["face.png"][0])).convert("RGB"))
    same, moved = (decode_png(table.column("pasted_png")[rows[f"face.png|dir|{s}"]].as_py()) for s in (0, 2))
    for pasted in (same, moved):
        assert pasted.shape == original.shape and 0 < np.any(pasted != original, axis=2).mean() < 0.5
    assert not np.array_equal(same, moved)


def test_an_edit_unit_missing_a_row_is_redone_whole(stages, tmp_path):
    """A fan-out unit (one input's edit rows) counts as done only when all its rows exist: here one row of face.png
    was never written (a run killed between the two parts Ray split a batch's output into, before the index)."""
    import json
    import shutil

    from pipelines import io

    root, _ = stages
    out = tmp_path / "edits"
    shutil.copytree(root / "edits", out)
    table = read_parts(out)
    keys = table.column("key").to_pylist()
    units = table.column("source_key").to_pylist()
    lost = next(k for k, u in zip(keys, units) if u == "face.png")
    for part in out.glob("part-*.parquet"):
        part.unlink()
    shutil.rmtree(out / "_index")
    kept = table.filter(pc.not_equal(table.column("key"), lost))
    io.write_named(str(out), "", 1, io.table_bytes(kept))
    assert main(["edit", "--input", str(root / "latents"), "--output", str(out), "--edits",
                 str(root / "edits.yaml")]) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert (stats["redone"], stats["rows_processed"]) == (1, units.count("face.png"))
    assert sorted(read_parts(out).column("key").to_pylist()) == sorted(keys)  # every row once, none twice


def test_an_aggregate_is_recomputed_when_its_input_changed_and_only_then(tmp_path):
    """channels over an invert output that gained a row recomputes (no stale "already done"); unchanged, it is a
    no-op; its population equals a fresh computation."""
    import json

    from conftest import write_samples

    write_samples(tmp_path / "photos", 2)
    latents, channels = tmp_path / "latents", tmp_path / "channels"
    invert = ["invert", "--input", str(tmp_path / "photos"), "--output", str(latents), "--align", "none",
              "--spaces", "s", "--steps", "1", "--lpips-weight", "0", "--mse-weight", "1"]
    stats = lambda: json.loads((channels / "stats.json").read_text())  # noqa: E731
    assert main(invert) == 0 and main(["channels", "--input", str(latents), "--output", str(channels)]) == 0
    assert stats()["population"] == 2 and not stats()["already_done"]
    write_samples(tmp_path / "more", 1, seed=3)
    (tmp_path / "more" / "00.png").rename(tmp_path / "photos" / "new.png")
    assert main(invert) == 0 and main(["channels", "--input", str(latents), "--output", str(channels)]) == 0
    assert stats()["population"] == 3 and not stats()["already_done"]
    assert main(["channels", "--input", str(latents), "--output", str(channels)]) == 0
    assert stats()["population"] == 3 and stats()["already_done"]
    assert main(["channels", "--input", str(latents), "--output", str(tmp_path / "fresh")]) == 0
    assert pq.read_table(channels / "population_stats.parquet").equals(
        pq.read_table(tmp_path / "fresh" / "population_stats.parquet"))
