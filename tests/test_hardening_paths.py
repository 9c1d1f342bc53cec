"""Issue 22 (paths): a bank name from a prompt or a web page stays in its bank folder, and a file
that is no bank is refused from its header alone. Small hand-made banks: no model is needed."""
from types import SimpleNamespace

import pytest

from seqlora_core.errors import BankError, InputError, SeqLoRAError
from test_hardening_files import small_bank

OUTSIDE = ["../../x", "../x.safetensors", "/etc/x", "\\\\server\\share\\x", "C:\\x", "sub/../../x",
           "a\\..\\..\\x", "./x", "sub//x", ""]


def _params(*items):
    return SimpleNamespace(items=list(items), positional=list(items), named={})


@pytest.mark.parametrize("name", OUTSIDE)
def test_a_tag_bank_name_cannot_leave_the_bank_folder(tmp_path, name):
    from a1111.network import tag_bank_path

    with pytest.raises(InputError) as err:
        tag_bank_path(str(tmp_path), name + ".safetensors")
    assert "\n" not in str(err.value)


def test_tag_bank_names_inside_the_folder_still_load(tmp_path):
    from a1111.network import picks_from_prompt, tag_bank_path

    folder = tmp_path / "models" / "seqlora"
    (folder / "sub").mkdir(parents=True)
    small_bank(("cat",)).save(folder / "sub" / "my bank (v2).safetensors")
    small_bank(("cat",)).save(tmp_path / "outside.safetensors")
    assert tag_bank_path(str(folder), "mine.safetensors") == str(folder / "mine.safetensors")
    picks = picks_from_prompt([_params("sub/my bank (v2)", "cat")], str(folder))
    assert [p.concept for p in picks] == ["cat"]
    with pytest.raises(SeqLoRAError, match="leaves it"):
        picks_from_prompt([_params("../../outside", "cat")], str(folder))
    with pytest.raises(SeqLoRAError, match="leaves it"):
        picks_from_prompt([_params(str(tmp_path / "outside"), "cat")], str(folder))


def test_comfyui_and_a1111_share_one_name_rule():
    from nodes.operations import check_bank_name
    from seqlora_core.bank import names

    assert check_bank_name is names.check_bank_name
    assert check_bank_name("../x") and check_bank_name("ok (1)") is None


def test_a_file_that_is_no_bank_is_refused_before_any_tensor_is_read(tmp_path, monkeypatch):
    import safetensors
    import torch
    from safetensors.torch import save_file

    from seqlora_core.bank.format import load_bank

    path = tmp_path / "checkpoint.safetensors"
    save_file({"model.diffusion_model.w": torch.zeros(64, 64)}, str(path), metadata={"format": "pt"})
    real, reads = safetensors.safe_open, []

    class Counting:
        def __init__(self, *args, **kw):
            self.inner = real(*args, **kw)

        def __enter__(self):
            self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def metadata(self):
            return self.inner.metadata()

        def keys(self):
            return self.inner.keys()

        def get_tensor(self, key):
            reads.append(key)
            return self.inner.get_tensor(key)

    monkeypatch.setattr(safetensors, "safe_open", Counting)
    with pytest.raises(BankError, match="not a SeqLoRA bank"):
        load_bank(path)
    assert reads == []


# -- the standalone tab ---------------------------------------------------------------------------
def _session(tmp_path, confined: bool = True):
    from seqlora_ui.tab import TabSession

    banks = tmp_path / "banks"
    banks.mkdir()
    small_bank(("cat",)).save(banks / "mine.safetensors")
    small_bank(("cup",)).save(tmp_path / "elsewhere.safetensors")
    return TabSession(host_factory=lambda: None, bank_path=banks / "mine.safetensors",
                      bank_root=banks if confined else None)


def test_the_standalone_tab_opens_and_merges_only_inside_its_bank_folder(tmp_path):
    from seqlora_ui.tab import TabActions

    session = _session(tmp_path)
    actions = TabActions(session)
    before = session.bank_path.read_bytes()
    for typed in (str(tmp_path / "elsewhere.safetensors"), str(session.bank_path.parent / ".." / "elsewhere.safetensors")):
        msg = actions.open_bank(typed, None)[0]
        assert "outside the bank folder" in msg and "--allow-any-path" in msg
        assert session.bank_path == tmp_path / "banks" / "mine.safetensors"
        msg = actions.merge_in(None, typed, False)[0]
        assert "outside the bank folder" in msg
    assert session.bank_path.read_bytes() == before
    assert "outside" not in actions.open_bank(str(tmp_path / "banks" / "other.safetensors"), None)[0]


def test_allow_any_path_lifts_the_confinement(tmp_path, monkeypatch):
    from seqlora_ui import standalone

    session = _session(tmp_path, confined=False)
    assert session.user_path(str(tmp_path / "elsewhere.safetensors")) == tmp_path / "elsewhere.safetensors"
    seen = {}
    monkeypatch.setattr(standalone, "serve", lambda *a, **kw: seen.update(kw))
    standalone.main(["--allow-any-path"])
    assert seen == {"allow_any_path": True}
    standalone.main([])
    assert seen == {"allow_any_path": False}
