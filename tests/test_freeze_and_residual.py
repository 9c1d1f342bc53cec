"""Freezing a concept (issue 17): training inside a lease stays in its block, B is stored
orthonormal with the same residual, and a residual that cannot be used is refused with one line,
the bank file left byte for byte as it was."""
import functools

import pytest
import torch

from seqlora_core.bank.lease import grant
from seqlora_core.errors import SeqLoRAError
from seqlora_core.method.projector import NullSpaceProjector, orthonormal_factors
from seqlora_core.method.residual_check import check_residual_range, residual_limit
from seqlora_core.method.trainer import train_concept

from conftest import quick_settings

FAST = dict(steps=2, bilevel_iters=1)


@pytest.fixture(scope="module")
def one_concept_bank(host, pixels):
    token, px = next(iter(pixels.items()))
    return train_concept(host, None, px, token, "thing", quick_settings(steps=1, bilevel_iters=1)).bank


def test_orthonormal_factors_keep_the_residual_and_the_free_space():
    g = torch.Generator().manual_seed(0)
    earlier = torch.randn(24, 4, generator=g, dtype=torch.float64)
    projector = NullSpaceProjector(24, [earlier])
    # an ill-conditioned B in the free space (columns of very different lengths), and some A
    b = projector.project(torch.randn(24, 3, generator=g, dtype=torch.float64)) * torch.tensor([1e-3, 1.0, 30.0])
    a = torch.randn(10, 3, generator=g)
    a_new, b_new = orthonormal_factors(a, b.float(), projector)
    assert a_new.dtype == b_new.dtype == torch.float32
    assert torch.allclose(b_new.double().T @ b_new.double(), torch.eye(3, dtype=torch.float64), atol=1e-6)
    before = a.double() @ b.float().double().T
    after = a_new.double() @ b_new.double().T
    assert float((after - before).norm() / before.norm()) < 1e-6
    assert float((earlier.T @ b_new.double()).norm()) < 1e-5  # still off the earlier basis
    a_lora, b_lora = orthonormal_factors(a, b.float())  # unconstrained: the QR alone
    assert torch.allclose(b_lora.double().T @ b_lora.double(), torch.eye(3, dtype=torch.float64), atol=1e-6)


def test_training_inside_a_lease_stays_in_its_block(host, pixels, one_concept_bank, monkeypatch):
    import seqlora_core.method.trainer as trainer

    bank = one_concept_bank
    lease = grant(bank, "alice", 2, 4, seed=0)
    lease_file = bank.with_lease(lease).lease_file(lease.id)
    seen = {}

    def recording(a, b, projector=None):  # the factors before and after the QR
        out = orthonormal_factors(a, b, projector)
        seen[len(seen)] = (a.detach().double().cpu() @ b.detach().double().cpu().T, out)
        return out

    monkeypatch.setattr(trainer, "orthonormal_factors", recording)
    token, px = list(pixels.items())[1]
    result = train_concept(host, lease_file, px, token, "thing", quick_settings(**FAST))
    # B was kept inside the lease while it trained: the last exact projection barely moves it
    assert 0 <= result.projection_drift < 1e-5, result.projection_drift
    concept = result.concept
    assert concept.lease == lease.id and any(a.abs().max() > 0 for a in concept.A.values())
    for name, b in concept.B.items():
        u = lease.blocks[name].double()
        b = b.double()
        assert float((b - u @ (u.T @ b)).norm()) < 1e-5 * float(b.norm())  # in span(U)
        assert torch.allclose(b.T @ b, torch.eye(b.shape[1], dtype=torch.float64), atol=1e-6)  # orthonormal
    for before, (a, b) in seen.values():  # the QR kept every layer's residual
        after = a.double() @ b.double().T
        assert float((after - before).norm()) <= 1e-5 * float(before.norm()) + 1e-12


def test_a_lora_concept_is_stored_orthonormal_too(host, pixels):
    token, px = list(pixels.items())[2]
    result = train_concept(host, None, px, token, "thing", quick_settings("lora", **FAST))
    assert result.projection_drift == 0.0
    for b in result.concept.B.values():
        assert torch.allclose(b.double().T @ b.double(), torch.eye(b.shape[1], dtype=torch.float64), atol=1e-6)


def test_the_residual_check_refuses_non_finite_and_overflowing_residuals():
    a = {"unet.x": torch.full((6, 2), 1e-2)}
    b = {"unet.x": torch.eye(5, 2)}
    check_residual_range("ok", a, b, None, torch.float32)  # small: accepted
    assert residual_limit(torch.float32) == (65504.0, torch.float16)  # banks reach fp16 hosts
    assert residual_limit(torch.bfloat16) == (65504.0, torch.float16)

    def refused(a, b, stats=None, dtype=torch.float32):
        with pytest.raises(SeqLoRAError) as info:
            check_residual_range("boom", a, b, stats, dtype)
        text = str(info.value)
        assert "\n" not in text and text.endswith("The bank was left as it was.") and "'boom'" in text
        return text

    bad = {"unet.x": a["unet.x"].clone()}
    bad["unet.x"][0, 0] = float("nan")
    assert "unet.x" in refused(bad, b) and "not finite" in refused(bad, b)
    two = {"unet.x": a["unet.x"], "unet.y": torch.full((6, 2), 1e6)}
    text = refused(two, {**b, "unet.y": torch.eye(5, 2)})
    assert "unet.y" in text and "1e+06" in text and "float16" in text
    # small entries, but an output that overflows on the training inputs' top direction
    stats = {"unet.x": (torch.tensor([1e14, 1.0]), torch.eye(5, 2))}
    assert "top direction" in refused(a, b, stats)


def test_the_cli_refuses_a_blown_up_concept_and_leaves_the_bank(one_concept_bank, photos, tmp_path,
                                                                monkeypatch, capsys):
    import tqdm
    import tqdm.auto

    import seqlora_core.method.trainer as trainer
    from seqlora_core.app.cli import main
    from tests.test_cli import QUICK

    path = tmp_path / "bank.safetensors"
    one_concept_bank.save(path)
    before = path.read_bytes()
    real = trainer.check_residual_range

    def blown_up(ident, a, b, *rest):  # the trained factors, with A as huge as a diverged run's
        return real(ident, {n: t * 1e30 for n, t in a.items()}, b, *rest)

    monkeypatch.setattr(trainer, "check_residual_range", blown_up)
    monkeypatch.setattr(tqdm.auto, "tqdm", functools.partial(tqdm.tqdm, disable=True))  # no progress bar
    token = list(photos)[1]
    code = main(["train", "--bank", str(path), "--base", "tiny", "--images", str(photos[token]),
                 "--token", "<boom>", "--init-word", "thing", "--resolution", "64", *QUICK])
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: Concept 'boom' was refused"), err
    assert lines[0].endswith("The bank was left as it was.")
    assert path.read_bytes() == before
    # no pending or temporary file beside it (the lock file may stay: it is the lock's)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["bank.safetensors"]
