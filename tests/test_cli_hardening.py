"""Held-out probes of issue 22: every bad flag, path or file is one line on stderr and exit 2,
never a traceback, a silently changed value or a bank the reader refuses."""
import json

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from test_cli import QUICK, assert_user_error, cli


@pytest.fixture(scope="module")
def one_concept_bank(tmp_path_factory, photos):
    """A bank with one concept (one minibatch), shared by the probes that need one."""
    bank = tmp_path_factory.mktemp("hardening") / "bank.safetensors"
    token = list(photos)[0]
    cli("train", "--bank", bank, "--base", "tiny", "--images", photos[token], "--token", token, *QUICK)
    return bank, token


def _train(bank, photos, *extra):
    token = list(photos)[1]
    return cli("train", "--bank", bank, "--base", "tiny", "--images", photos[token], "--token", "<probe>",
               *QUICK, *extra, check=False)


def _rewrite_concepts(src, dst, **changes):
    """A copy of a bank with its first concept's metadata changed (what an older or hand-made bank holds)."""
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    concepts = json.loads(meta["concepts"])
    concepts[0].update(changes)
    meta["concepts"] = json.dumps(concepts)
    save_file(tensors, str(dst), metadata=meta)


# -- (1) a successful train run never writes a bank the reader refuses --------------------------
@pytest.mark.parametrize("flag, value, words", [
    ("--lr-b", "nan", ("Learning rate B", "finite")), ("--lr-embedding", "nan", ("embedding", "finite")),
    ("--eps", "nan", ("ε", "finite")), ("--lr-a", "inf", ("Learning rate A", "finite")),
    ("--eps", "-inf", ("finite",)), ("--lr-b", "2", ("between 0 and 1",)), ("--steps", "inf", ("whole number",)),
    ("--resolution", "100", ("multiple of 8",))])
def test_non_finite_or_out_of_range_setting_is_refused_before_training(one_concept_bank, photos, flag, value, words):
    bank, _ = one_concept_bank
    before = bank.read_bytes()
    assert_user_error(_train(bank, photos, f"{flag}={value}"), flag, *words)  # = : "-inf" is no flag
    assert bank.read_bytes() == before


def test_non_finite_eps_creates_no_bank(photos, tmp_path):
    bank = tmp_path / "new.safetensors"
    assert_user_error(_train(bank, photos, "--eps", "nan"), "finite")
    assert not bank.exists()


# -- (4) generate's numbers: no all-black picture with exit 0, no silent rounding ---------------
def _generate(bank, *extra, out="x.png"):
    return cli("generate", "--bank", bank, "--base", "tiny", "--prompt", "a photo", "--steps", "1",
               "--out", out, *extra, check=False)


@pytest.mark.parametrize("flag, value, words", [
    ("--steps", "0", ("between 1 and 1000",)), ("--guidance", "nan", ("finite",)), ("--guidance", "inf", ("finite",)),
    ("--guidance", "101", ("between 0 and 100",)), ("--resolution", "0", ("between 64 and 2048",)),
    ("--resolution", "-8", ("between",)), ("--resolution", "4", ("between",)), ("--resolution", "100000", ("between",)),
    ("--resolution", "100", ("multiple of 8",)), ("--seed", str(2**64), ("Seed", "between")), ("--seed", "-1", ("Seed",))])
def test_generate_number_flags(one_concept_bank, tmp_path, flag, value, words):
    bank, _ = one_concept_bank
    out = tmp_path / "x.png"
    assert_user_error(_generate(bank, f"{flag}={value}", out=out), flag, *words)
    assert not out.exists()


@pytest.mark.parametrize("strength", ["1e309", "nan", "-1e30", "11", "inf"])
def test_generate_strength_must_be_finite_and_bounded(one_concept_bank, tmp_path, strength):
    bank, token = one_concept_bank
    out = tmp_path / "x.png"
    proc = _generate(bank, "--concepts", f"{token.strip('<>')}:{strength}", out=out)
    assert_user_error(proc, "Strength", "-10 to 10")
    assert not out.exists()


def test_a_token_another_concept_already_uses_is_refused(one_concept_bank, photos, tmp_path):
    bank, _ = one_concept_bank
    odd = tmp_path / "odd.safetensors"
    _rewrite_concepts(bank, odd, token="<probe>")  # concept 'chelsea' answering to <probe>
    before = odd.read_bytes()
    assert_user_error(_train(odd, photos), "already uses the token <probe>")
    assert odd.read_bytes() == before


def test_bank_info_json_is_json_with_non_finite_numbers(one_concept_bank, tmp_path):
    bank, _ = one_concept_bank
    odd = tmp_path / "nan.safetensors"
    _rewrite_concepts(bank, odd, final_loss=float("nan"))  # json.dumps writes a bare NaN
    text = cli("bank", "info", odd, "--json").stdout
    info = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))
    assert info["concepts"][0]["final_loss"] is None


# -- (3) one line instead of a traceback: devices, bases, places that take no file ---------------
@pytest.mark.parametrize("device, words", [("foo", ("auto, cpu, cuda",)), ("meta", ("'meta'",)),
                                           pytest.param("cuda", ("no CUDA GPU",), marks=pytest.mark.skipif(
                                               torch.cuda.is_available(), reason="this machine has CUDA"))])
def test_train_on_an_unusable_device(one_concept_bank, photos, device, words):
    bank, _ = one_concept_bank
    before = bank.read_bytes()
    assert_user_error(_train(bank, photos, "--device", device), "Device", *words)
    assert bank.read_bytes() == before


def test_train_on_what_is_no_base(one_concept_bank, photos, tmp_path):
    bank, _ = one_concept_bank
    before = bank.read_bytes()
    lora = tmp_path / "some-lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(lora))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not safetensors")
    for base, words in [(tmp_path, ("not a diffusers SD-1.5 folder", "unet/config.json")), ("", ("Base is empty",)),
                        (lora, ("some-lora.safetensors is not an SD-1.5 checkpoint",)),
                        (junk, ("junk.safetensors is not a readable .safetensors file",))]:
        proc = cli("train", "--bank", bank, "--base", base, "--images", tmp_path, "--token", "<probe>", *QUICK,
                   check=False)
        assert_user_error(proc, *words)
    assert bank.read_bytes() == before


def test_train_into_a_place_that_takes_no_file(photos, tmp_path):
    proc = _train("/proc/seqlora-probe.safetensors", photos)
    assert_user_error(proc, "/proc/seqlora-probe.safetensors", "no lock file")


@pytest.mark.parametrize("out, words", [("x.unknownext", ("'.unknownext'", ".png")), ("DIR", ("is a folder",)),
                                        ("/proc/seqlora-probe.png", ("no file can be created in /proc",)),
                                        ("", ("path is empty",))])
def test_generate_out_is_checked_before_the_model_loads(one_concept_bank, tmp_path, out, words):
    bank, _ = one_concept_bank
    out = str(tmp_path) if out == "DIR" else out if out.startswith("/") or not out else str(tmp_path / out)
    assert_user_error(_generate(bank, out=out), *words)


def test_generate_with_missing_control_files(one_concept_bank, tmp_path):
    bank, _ = one_concept_bank
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    assert_user_error(_generate(bank, "--sketch", tmp_path / "nope.png", "--adapter", adapter), "sketch", "does not exist")
    sketch = tmp_path / "sketch.png"
    Image.new("RGB", (8, 8)).save(sketch)
    assert_user_error(_generate(bank, "--sketch", sketch, "--adapter", tmp_path / "nope"), "adapter", "does not exist")


@pytest.mark.parametrize("text", ["{bad json", '{"people": 3}', '{"people": [{"pose_keypoints_2d": 5}]}', "[1, 2]"])
def test_generate_with_malformed_keypose_json(one_concept_bank, tmp_path, text):
    bank, _ = one_concept_bank
    pose = tmp_path / "pose.json"
    pose.write_text(text)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    assert_user_error(_generate(bank, "--keypose", pose, "--adapter", adapter), "pose.json is not OpenPose keypoints JSON")


@pytest.mark.parametrize("out, words", [("/proc/seqlora-probe.safetensors", ("no file can be created in /proc",)),
                                        ("DIR", ("is a folder",)), ("", ("path is empty",))])
def test_export_out_is_checked(one_concept_bank, tmp_path, out, words):
    bank, _ = one_concept_bank
    assert_user_error(cli("export", bank, "--out", str(tmp_path) if out == "DIR" else out, check=False), *words)


@pytest.mark.parametrize("strength", ["nan", "1e309", "-1e30", "s=11"])
def test_a1111_tag_strength_has_the_same_bound(strength):
    """<seqlora:BANK:ID:STRENGTH> is parsed apart from the selection text; it shares check_strength."""
    from types import SimpleNamespace

    from a1111.network import parse_params
    from seqlora_core.errors import SeqLoRAError

    items = ["mine", "chelsea", strength]
    params = SimpleNamespace(items=items, positional=[i for i in items if "=" not in i],
                             named=dict(i.split("=", 1) for i in items if "=" in i))
    with pytest.raises(SeqLoRAError, match="finite number from -10 to 10") as info:
        parse_params([params])
    assert "\n" not in str(info.value)
