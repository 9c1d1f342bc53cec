"""Node-side logic that needs no ComfyUI: concept tokens in prompts, concept selection, panel data."""
import pytest
import torch

from nodes.operations import info_text, merge, panel_data
from nodes.concept_tokenizer import PREFIX, ConceptTokenizer
from seqlora_core.errors import InputError


class FakeSDTokenizer:
    """The two members of ComfyUI's SDTokenizer that ConceptTokenizer relies on."""

    embedding_directory = None

    def _try_get_embedding(self, name):
        return None, ""

    def tokenize_with_weights(self, text, return_word_ids=False, **kwargs):
        out = []
        for word in text.split():
            if word.startswith("embedding:") and self.embedding_directory is not None:
                emb, _ = self._try_get_embedding(word[len("embedding:"):])
                out += [(emb[i], 1.0) for i in range(emb.shape[0])] if emb is not None else []
            else:
                out.append((word, 1.0))
        return out


class FakeSD1Tokenizer:
    def __init__(self):
        self.clip_l = FakeSDTokenizer()

    def tokenize_with_weights(self, text, return_word_ids=False, **kwargs):
        return {"l": self.clip_l.tokenize_with_weights(text)}


def test_concept_tokens_become_their_vectors_and_keep_the_graph():
    vec = torch.randn(1, 8, requires_grad=True)
    inner = FakeSD1Tokenizer()
    tok = ConceptTokenizer(inner, {"<chelsea>": vec})
    out = tok.tokenize_with_weights("a photo of <chelsea>, sleeping")["l"]
    tensors = [t for t, _ in out if torch.is_tensor(t)]
    assert len(tensors) == 1 and torch.equal(tensors[0], vec[0])
    tensors[0].sum().backward()
    assert vec.grad is not None  # training reaches the learned embedding
    assert [w for w, _ in out if not torch.is_tensor(w)] == ["a", "photo", "of", ",", "sleeping"]
    # the wrapped tokenizer itself is untouched
    assert inner.clip_l.embedding_directory is None
    assert inner.tokenize_with_weights(f"embedding:{PREFIX}chelsea")["l"] == [(f"embedding:{PREFIX}chelsea", 1.0)]


def test_wrapping_twice_merges_concepts():
    a, b = torch.ones(1, 4), torch.zeros(1, 4)
    tok = ConceptTokenizer(ConceptTokenizer(FakeSD1Tokenizer(), {"<a>": a}), {"<b>": b})
    out = tok.tokenize_with_weights("<a> and <b>")["l"]
    assert sum(torch.is_tensor(t) for t, _ in out) == 2


def test_selection_parsing(stream_bank):
    ids = [c.id for c in stream_bank.concepts]
    assert stream_bank.parse_selection("all") == (ids, {})
    assert stream_bank.parse_selection(f"<{ids[0]}>:0.5, {ids[1]}") == ([ids[0], ids[1]], {ids[0]: 0.5})
    with pytest.raises(InputError):
        stream_bank.parse_selection("nobody")
    with pytest.raises(InputError):
        stream_bank.parse_selection(f"{ids[0]}:lots")


def test_panel_data_and_info(stream_bank):
    data = panel_data(stream_bank)
    assert [c["id"] for c in data["concepts"]] == [c.id for c in stream_bank.concepts]
    assert data["widths"] == [{"width": 64, "layers": 48, "used": 3, "capacity": 16, "leased_width": 0}]
    assert data["leases"] == []
    assert data["orthogonality"] < 1e-6
    assert "3 concept(s)" in info_text(stream_bank)


def test_merge_node_refuses_forks_then_rebases_and_shows_leases(stream_bank):
    from dataclasses import replace

    from seqlora_core.bank.lease import grant
    from seqlora_core.errors import BankError

    base = stream_bank.without(stream_bank.concepts[-1].id)
    last = stream_bank.concepts[-1]
    gen = torch.Generator().manual_seed(5)
    other = replace(last, id="other", token="<other>", hash="", created="9999",
                    B={n: torch.linalg.qr(torch.randn(*b.shape, generator=gen))[0] for n, b in last.B.items()})
    fork = base.with_concept(other)
    with pytest.raises(BankError, match="overlap"):
        merge([stream_bank, fork], False, "")
    bank, report = merge([stream_bank, fork], True, "")
    assert "rebased other: relative residual change" in report
    # the fork removed the last concept (its history says so): the merge does not bring it back
    assert f"left out {last.id}" in report
    # merged concepts come in a fixed order (creation time, then content hash), whatever the input order
    assert bank.max_orthogonality_error() < 1e-6
    assert sorted(c.id for c in bank.concepts[:-1]) == sorted(c.id for c in stream_bank.concepts[:-1])
    assert bank.concepts[-1].id == "other"
    leased = bank.with_lease(grant(bank, "alice", 2, 4, seed=0))
    assert panel_data(leased)["leases"][0]["name"] == "alice"
    assert panel_data(leased)["widths"][0]["leased_width"] == 8
    assert "lease alice" in info_text(leased)


def test_load_node_fingerprint_follows_the_file(tmp_path, monkeypatch, stream_bank):
    import sys
    import types

    from nodes.operations import bank_file_identity

    path = tmp_path / "b.safetensors"
    fake = types.SimpleNamespace(folder_names_and_paths={"seqlora": ([str(tmp_path)], {".safetensors"})},
                                 get_full_path=lambda folder, name: str(tmp_path / name) if (tmp_path / name).exists() else None)
    monkeypatch.setitem(sys.modules, "folder_paths", fake)
    assert bank_file_identity("b.safetensors") == ("b.safetensors", None)
    stream_bank.save(path)
    first = bank_file_identity("b.safetensors")
    assert first == bank_file_identity("b.safetensors")  # unchanged file: ComfyUI may reuse its output
    stream_bank.without(stream_bank.concepts[0].id).save(path)
    assert bank_file_identity("b.safetensors") != first  # rewritten: Load Basis Bank runs again


def test_concept_tokens_match_whatever_their_case():
    vec = torch.randn(1, 8)
    tok = ConceptTokenizer(FakeSD1Tokenizer(), {"<Chelsea>": vec})
    for prompt in ("a photo of <chelsea>", "a photo of <CHELSEA>", "a photo of <Chelsea>"):
        out = tok.tokenize_with_weights(prompt)["l"]
        assert sum(torch.is_tensor(t) for t, _ in out) == 1, prompt


def test_widget_values_are_checked_before_the_queue_runs():
    from nodes import validation

    assert validation.token_problem("<chelsea>") is None
    assert "must look like <name>" in validation.token_problem("my cat")
    assert validation.token_problem(None) is None  # linked: checked when the node runs
    assert validation.bank_name_problem("my bank (2)") is None
    assert "may only use" in validation.bank_name_problem("../etc")
    for hidden in ("..", ".", ".hidden", " .x.safetensors"):  # issue 23: hidden files in models/seqlora
        assert "may not start with a dot" in validation.bank_name_problem(hidden), hidden
    assert validation.bank_name_problem("v1.5 cats") is None
    assert validation.lora_name_problem("../x").startswith("LoRA name '../x'")
    assert validation.selection_problem("all") is None
    assert validation.selection_problem("<chelsea>:0.8, coffee") is None
    assert "not a number" in validation.selection_problem("chelsea:lots")
    assert "not a concept id" in validation.selection_problem("a cat:1")
    assert validation.regions_problem('{"width": 64, "height": 64, "regions": [{"box": [0, 0, 8, 8], "prompt": "x"}]}') is None
    assert "empty or malformed box" in validation.regions_problem('{"regions": [{"box": [8, 0, 0, 8], "prompt": "x"}]}')
    assert "Regions must be JSON" in validation.regions_problem("{")
    assert validation.keypoints_problem('{"people": []}') is None
    assert "OpenPose JSON" in validation.keypoints_problem("[1, 2")
    assert validation.first_problem(None, None) is True
    assert validation.first_problem(None, "second", "third") == "second"


def test_image_folder_loads_photos_of_any_size(tmp_path):
    import numpy as np
    from PIL import Image

    from nodes.image_folder import image_folders, load_folder

    photos = tmp_path / "cat"
    photos.mkdir()
    Image.fromarray(np.full((40, 100, 3), 255, np.uint8)).save(photos / "wide.png")
    Image.fromarray(np.zeros((90, 30, 3), np.uint8)).save(photos / "tall.jpg")
    (photos / "notes.txt").write_text("not an image")
    (tmp_path / "empty").mkdir()
    assert image_folders(str(tmp_path)) == ["cat"]
    crop, crop_mask = load_folder(str(tmp_path), "cat", 64, "crop")
    assert crop.shape == (2, 64, 64, 3) and 0 <= float(crop.min()) and float(crop.max()) <= 1
    assert crop_mask.shape == (2, 64, 64) and float(crop_mask.abs().max()) == 0  # no transparency: nothing left out
    pad, _ = load_folder(str(tmp_path), "cat", 64, "pad")
    assert abs(float(pad[0, 32, 0, 0]) - 127 / 255) < 0.01  # grey bar beside the tall photo (sorted: tall, wide)
    assert float(crop[1].min()) > 0.99  # the wide white photo cropped: no grey
    with pytest.raises(InputError):
        load_folder(str(tmp_path), "../", 64, "crop")
    with pytest.raises(InputError):
        load_folder(str(tmp_path), "empty", 64, "crop")


def test_panel_shows_loss_and_fingerprint(stream_bank):
    data = panel_data(stream_bank)
    assert data["fingerprint"] == stream_bank.base["fingerprint"]
    assert all(isinstance(c["loss"], float) for c in data["concepts"])


def test_folder_masks_follow_load_image_and_train_concept_reads_them_as_background(tmp_path):
    """A PNG with a transparent background: Load Image Folder's MASK is 1 - alpha (ComfyUI's Load
    Image convention), and Train Concept's default reading turns it into weight 1 on the subject."""
    import numpy as np
    from PIL import Image

    from nodes.image_folder import load_folder
    from nodes.operations import MASK_MEANINGS, masks_to_weights

    (tmp_path / "mug").mkdir()
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., :3] = 180
    rgba[16:48, 16:48, 3] = 255  # the subject, opaque in the middle
    Image.fromarray(rgba).save(tmp_path / "mug" / "mug.png")
    Image.fromarray(np.full((64, 64, 3), 40, np.uint8)).save(tmp_path / "mug" / "room.jpg")
    images, mask = load_folder(str(tmp_path), "mug", 32, "crop")
    assert mask.shape == (2, 32, 32)
    assert float(mask[0, 16, 16]) == 0 and float(mask[0, 0, 0]) == 1  # 1 where transparent
    assert float(mask[1].abs().max()) == 0  # the photo without alpha: nothing masked
    weights = masks_to_weights(mask, images, 16)
    assert weights.shape == (2, 16, 16)
    assert float(weights[0, 8, 8]) > 0.99 and float(weights[0, 0, 0]) < 0.01 and float(weights[1].min()) == 1
    subject = masks_to_weights(1 - mask, images, 16, MASK_MEANINGS[1])
    assert torch.allclose(subject, weights)
    # the first release's long labels (issue 23: truncated in the widget) still mean the same
    assert torch.allclose(masks_to_weights(mask, images, 16, "background (Load Image: transparent = 1)"), weights)
    assert torch.allclose(masks_to_weights(1 - mask, images, 16, "subject (segmentation: subject = 1)"), weights)
    # one mask for a whole batch, of another size (Load Image's 64×64 empty mask): broadcast, resized
    assert float(masks_to_weights(torch.zeros(1, 64, 64), images, 16).min()) == 1
    with pytest.raises(InputError, match="one per image"):
        masks_to_weights(torch.zeros(3, 32, 32), images, 16)
    with pytest.raises(InputError, match="mask_means"):
        masks_to_weights(mask, images, 16, "whatever")


def test_load_basis_bank_lists_no_hidden_file(monkeypatch):
    """Issue 23: ComfyUI lists hidden files too; a `.x.safetensors` (or one in a hidden folder) is
    not offered as a bank."""
    import sys
    import types

    from nodes.operations import bank_files

    names = ["a.safetensors", ".hidden.safetensors", "...safetensors", "sub/b.safetensors", ".git/c.safetensors",
             "sub/.d.safetensors"]
    fake = types.SimpleNamespace(folder_names_and_paths={"seqlora": ([], {".safetensors"})},
                                 get_filename_list=lambda folder: list(names))
    monkeypatch.setitem(sys.modules, "folder_paths", fake)
    assert bank_files() == ["a.safetensors", "sub/b.safetensors"]


def test_quick_on_cpu_caps_size_and_length_and_says_so_but_never_grows_a_run():
    from nodes.operations import QUICK_CPU_RESOLUTION, QUICK_CPU_STEPS, quick_cpu_settings
    from seqlora_core.method.trainer import TrainSettings

    full = TrainSettings(resolution=512, steps=200)
    quick, note = quick_cpu_settings(full)
    assert (quick.resolution, quick.steps) == (QUICK_CPU_RESOLUTION, QUICK_CPU_STEPS)
    assert quick.lr_a == full.lr_a and quick.rank == full.rank  # nothing else changed
    assert "512 px and 200" in note and "quick_on_cpu" in note
    small = TrainSettings(resolution=64, steps=2)
    assert quick_cpu_settings(small) == (small, "")  # already quick: unchanged, nothing said


def test_find_concept_regions_finds_each_concepts_vectors_in_comfys_token_window():
    """Comfy's tokenizer puts a concept's vectors in place of token ids; the positions of those
    vectors in the first 77-token window (after the start token) are where its attention is read."""
    from nodes.auto_regions import concept_positions

    a, b = torch.randn(1, 8), torch.randn(2, 8)  # <b> has two vectors

    class FakeClip:
        tokenizer = ConceptTokenizer(FakeSD1Tokenizer(), {"<a>": a, "<b>": b})

        def tokenize(self, text):  # as ComfyUI's CLIP: windows of (token, weight) after a start token
            return {"l": [[("<start>", 1.0)] + self.tokenizer.tokenize_with_weights(text)["l"]]}

    positions = concept_positions(FakeClip(), "a photo of <a> and <b>", {"<a>": a, "<b>": b}, {"ia": "<a>", "ib": "<b>"})
    assert positions == {"ia": [4], "ib": [6, 7]}
    assert concept_positions(FakeClip(), "a photo of <a>", {"<a>": a, "<b>": b}, {"ia": "<a>", "ib": "<b>"}) == {"ia": [4]}
