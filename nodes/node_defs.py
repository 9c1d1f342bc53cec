"""SeqLoRA nodes, declared with ComfyUI's V3 node API (comfy_api.latest), category "SeqLoRA".

Each class only declares inputs/outputs and calls ``nodes.operations``. Errors the user caused reach
ComfyUI as one-sentence exceptions (SeqLoRAError).
"""
from __future__ import annotations

from comfy_api.latest import io

import inspect

from seqlora_core.settings import TRAINING_SETTINGS, Setting, train_settings

from . import operations

CATEGORY = "SeqLoRA"
BasisBank = io.Custom("BASIS_BANK")
operations.register_folder()


def _register_routes() -> None:
    """GET /seqlora/concepts: the tokens of every bank in models/seqlora (the box editor's picker)."""
    try:
        from aiohttp import web
        from server import PromptServer
    except ImportError:
        return

    @PromptServer.instance.routes.get("/seqlora/concepts")
    async def concepts(request):
        return web.json_response(operations.bank_tokens())


_register_routes()


def _setting_input(setting: Setting):
    """The node input of one training setting (seqlora_core.settings); advanced ones folded where
    this ComfyUI's node API supports it."""
    kw = {"default": setting.default, "tooltip": f"{setting.title}: {setting.help}"}
    if setting.choices is not None:
        cls, kw["options"] = io.Combo.Input, list(setting.choices)
    elif setting.kind is str:
        cls = io.String.Input
    else:
        cls = io.Int.Input if setting.kind is int else io.Float.Input
        kw.update({k: v for k, v in (("min", setting.min), ("max", setting.max), ("step", setting.step)) if v is not None})
        if setting.name == "seed":
            kw["control_after_generate"] = False
    if "advanced" in inspect.signature(cls.__init__).parameters:
        kw["advanced"] = setting.advanced
    return cls(setting.name, **kw)


def _bank_ui(bank, text: str) -> dict:
    """What the bank nodes show: the info text and the js panel's data."""
    return {"text": [text], "seqlora_bank": [operations.panel_data(bank)]}


def _send(event: str, data: dict) -> None:
    try:
        from server import PromptServer

        PromptServer.instance.send_sync(event, data)
    except Exception:  # no server (scripts, tests): progress still goes to the progress bar
        pass


class TrainConcept(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SeqLoRATrainConcept", display_name="Train Concept (SeqLoRA)", category=CATEGORY,
            description="Teach the loaded SD-1.5 one new concept from reference images, orthogonal to every "
                        "concept already in the bank (bilevel training, exact null-space projection).",
            inputs=[
                io.Model.Input("model"), io.Clip.Input("clip"), io.Vae.Input("vae"),
                io.Image.Input("images", tooltip="reference images of the concept (a batch)"),
                io.String.Input("token", default="<my-concept>", tooltip="the word to use in prompts, e.g. <chelsea>"),
                io.String.Input("init_word", default="object", tooltip="a word close to the concept (cat, mug, person)"),
                BasisBank.Input("bank", optional=True, tooltip="bank to extend; none starts a new one for this model"),
                *(_setting_input(s) for s in TRAINING_SETTINGS),
            ],
            outputs=[BasisBank.Output(display_name="bank"), io.Model.Output(display_name="model"),
                     io.Clip.Output(display_name="clip"), io.Image.Output(display_name="loss_curve")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, clip, vae, images, token, init_word, bank=None, **setting_values):
        import comfy.utils

        settings = train_settings(setting_values)
        bar = comfy.utils.ProgressBar(settings.steps)
        node = cls.hidden.unique_id if cls.hidden else None

        def progress(step, total, loss):
            bar.update_absolute(step, total)
            _send("seqlora.progress", {"node": node, "step": step, "total": total, "loss": loss})

        new_bank, new_model, new_clip, curve = operations.train(model, clip, vae, images, token, init_word, bank,
                                                               settings, progress)
        _send("seqlora.bank", {"node": node, **operations.panel_data(new_bank)})
        return io.NodeOutput(new_bank, new_model, new_clip, curve)


class LoadBasisBank(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SeqLoRALoadBasisBank", display_name="Load Basis Bank", category=CATEGORY,
            description="Load a SeqLoRA bank from models/seqlora.",
            inputs=[io.Combo.Input("bank_name", options=operations.bank_files()),
                    io.Model.Input("model", optional=True, tooltip="refuse the bank if it was made for another base")],
            outputs=[BasisBank.Output(display_name="bank"), io.String.Output(display_name="info")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def fingerprint_inputs(cls, bank_name, model=None):
        """Re-run when the file changes (another workflow, the tab or the CLI saved it), not only
        when the name does: ComfyUI would otherwise serve the bank it loaded first."""
        return operations.bank_file_identity(bank_name)

    @classmethod
    def execute(cls, bank_name, model=None):
        bank = operations.load_bank_file(bank_name, model)
        text = operations.info_text(bank)
        return io.NodeOutput(bank, text, ui=_bank_ui(bank, text))


class SaveBasisBank(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SeqLoRASaveBasisBank", display_name="Save Basis Bank", category=CATEGORY,
            description="Save a bank into models/seqlora (atomic; an existing file is kept unless overwrite is on).",
            inputs=[BasisBank.Input("bank"), io.String.Input("bank_name", default="my_concepts"),
                    io.Boolean.Input("overwrite", default=False)],
            outputs=[io.String.Output(display_name="file")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, bank, bank_name, overwrite):
        name = operations.save_bank_file(bank, bank_name, overwrite)
        return io.NodeOutput(name, ui=_bank_ui(bank, f"saved {name}\n" + operations.info_text(bank)))


class BasisBankInfo(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SeqLoRABasisBankInfo", display_name="Basis Bank Info", category=CATEGORY,
            description="What a bank holds: concepts, capacity used per layer, orthogonality.",
            inputs=[BasisBank.Input("bank")],
            outputs=[io.String.Output(display_name="info")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, bank):
        text = operations.info_text(bank)
        return io.NodeOutput(text, ui=_bank_ui(bank, text))


class MergeBasisBanks(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SeqLoRAMergeBasisBanks", display_name="Merge Basis Banks", category=CATEGORY,
            description="Merge banks of one base: returned leases exactly; copies extended apart are refused "
                        "unless rebase is on (later concepts made orthogonal, their A refitted).",
            inputs=[BasisBank.Input("bank_1"), BasisBank.Input("bank_2"),
                    BasisBank.Input("bank_3", optional=True), BasisBank.Input("bank_4", optional=True),
                    io.Boolean.Input("rebase", default=False),
                    io.String.Input("renames", default="", tooltip="old=new, … for an id two banks hold with different contents")],
            outputs=[BasisBank.Output(display_name="bank"), io.String.Output(display_name="info")],
        )

    @classmethod
    def execute(cls, bank_1, bank_2, rebase, renames, bank_3=None, bank_4=None):
        banks = [b for b in (bank_1, bank_2, bank_3, bank_4) if b is not None]
        bank, report = operations.merge(banks, rebase, renames)
        text = report + "\n" + operations.info_text(bank)
        return io.NodeOutput(bank, text, ui=_bank_ui(bank, text))


class ComposeConcepts(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SeqLoRAComposeConcepts", display_name="Compose Concepts", category=CATEGORY,
            description="Apply any subset of a bank's concepts to MODEL and CLIP (a plain sum, like stock LoRA "
                        "loading); their tokens then work in ordinary prompts.",
            inputs=[io.Model.Input("model"), io.Clip.Input("clip"), BasisBank.Input("bank"),
                    io.String.Input("concepts", default="all", tooltip="all, or id:strength, … e.g. chelsea:1.0, coffee:0.8")],
            outputs=[io.Model.Output(display_name="model"), io.Clip.Output(display_name="clip")],
        )

    @classmethod
    def execute(cls, model, clip, bank, concepts):
        ids, strengths = bank.parse_selection(concepts)
        new_model, new_clip = operations.compose(model, clip, bank, ids, strengths)
        return io.NodeOutput(new_model, new_clip)


class RegionalConcepts(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SeqLoRARegionalConcepts", display_name="Regional Concepts", category=CATEGORY,
            description="Give regions of the image their own prompts (e.g. one concept per box): inside each "
                        "region the cross-attention reads that region's prompt, elsewhere the global one. "
                        "Chain ControlNet / T2I-Adapter (sketch, keypose) on the conditioning as usual.",
            inputs=[io.Model.Input("model"), io.Clip.Input("clip", tooltip="the composed CLIP, so concept tokens work"),
                    io.String.Input("regions", multiline=True,
                                    default='{"width": 512, "height": 512, "regions": []}',
                                    tooltip="boxes and prompts; drawn with the box editor on the node"),
                    io.Mask.Input("mask_1", optional=True), io.String.Input("mask_1_prompt", default="", optional=True),
                    io.Mask.Input("mask_2", optional=True), io.String.Input("mask_2_prompt", default="", optional=True)],
            outputs=[io.Model.Output(display_name="model")],
        )

    @classmethod
    def execute(cls, model, clip, regions, mask_1=None, mask_1_prompt="", mask_2=None, mask_2_prompt=""):
        from seqlora_core.sampling.regions import Region

        from .regional import apply_regions, parse_regions_json

        boxes, width, height = parse_regions_json(regions)
        for mask, prompt in ((mask_1, mask_1_prompt), (mask_2, mask_2_prompt)):
            if mask is not None and prompt.strip():
                boxes.append(Region(prompt.strip(), mask=mask[0].float().cpu()))
        operations.check_model(model)
        return io.NodeOutput(apply_regions(model, clip, boxes, width, height))


class DrawKeypose(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SeqLoRADrawKeypose", display_name="Draw Keypose (SeqLoRA)", category=CATEGORY,
            description="Draw an OpenPose-style keypose image from keypoints (OpenPose JSON) for a keypose "
                        "T2I-Adapter or ControlNet.",
            inputs=[io.String.Input("keypoints", multiline=True,
                                    default='{"people": [{"pose_keypoints_2d": []}]}'),
                    io.Int.Input("width", default=512, min=64, max=4096, step=8),
                    io.Int.Input("height", default=512, min=64, max=4096, step=8)],
            outputs=[io.Image.Output(display_name="keypose")],
        )

    @classmethod
    def execute(cls, keypoints, width, height):
        import json

        import numpy as np
        import torch

        from seqlora_core.errors import InputError
        from seqlora_core.sampling.keypose import draw_keypose

        try:
            data = json.loads(keypoints)
        except json.JSONDecodeError:
            raise InputError("Keypoints must be OpenPose JSON: {\"people\": [{\"pose_keypoints_2d\": [x, y, c, …]}]}.") from None
        image = draw_keypose(data, width, height).astype(np.float32) / 255.0
        return io.NodeOutput(torch.from_numpy(image)[None])


NODES = [TrainConcept, LoadBasisBank, SaveBasisBank, BasisBankInfo, MergeBasisBanks, ComposeConcepts, RegionalConcepts, DrawKeypose]
NODE_CLASS_MAPPINGS = {n.define_schema().node_id: n for n in NODES}
NODE_DISPLAY_NAME_MAPPINGS = {n.define_schema().node_id: n.define_schema().display_name for n in NODES}
