"""SeqLoRA nodes, declared with ComfyUI's V3 node API (comfy_api.latest), category "SeqLoRA".

Each class only declares inputs/outputs (with a tooltip on every one), checks what can be checked
before the queue runs (``validate_inputs``: ComfyUI marks the node red instead of failing mid-run)
and calls ``nodes.operations``. Errors the user caused reach ComfyUI as one-sentence exceptions
(SeqLoRAError). Importing this module has no side effect; ``nodes.extension`` hands ``NODES`` to
ComfyUI.
"""
from __future__ import annotations

import inspect
import logging

from comfy_api.latest import io

from seqlora_core.settings import DEFAULT_RESIDUALS, RESIDUAL_MODES, TRAINING_SETTINGS, Setting, train_settings

from . import operations, validation
from .server_events import send

log = logging.getLogger("seqlora")
CATEGORY = "SeqLoRA"
BasisBank = io.Custom("BASIS_BANK")
FoundRegions = io.Custom("SEQLORA_REGIONS")
BANK_TIP = "a SeqLoRA bank: concepts with orthogonal bases, their LoRA factors and tokens"


def _setting_input(setting: Setting):
    """The node input of one training setting (seqlora_core.settings); advanced ones folded where
    this ComfyUI's node API supports it."""
    kw = {"default": setting.default, "tooltip": f"{setting.title}: {setting.help}{TIME_NOTES.get(setting.name, '')}"}
    if setting.kind is float and setting.step is not None and setting.step < 1e-6:
        # a float widget shows a fixed number of decimals (eps as 0.000000010); typed as text ("1e-8")
        # it is read and range-checked like every setting (seqlora_core.settings.Setting.coerce)
        kw["default"] = f"{setting.default:g}"
        kw["tooltip"] += f" (a number, e.g. {setting.default:g}; from {setting.min:g} to {setting.max:g})"
        cls = io.String.Input
    elif setting.choices is not None:
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


# How long a run takes, in the tooltips of the two settings that decide it (issue 23).
_CPU_TIME = (f"a real SD-1.5 takes about 38 s per minibatch at 64 px on a 2-core CPU, so on a CPU "
             f"quick_on_cpu (on by default) trains {operations.QUICK_CPU_STEPS} minibatches at "
             f"{operations.QUICK_CPU_RESOLUTION} px: about 3 minutes of training; the whole node (forecast, "
             f"statistics, preview) took about 8 minutes on 2 cores shared with other work")
TIME_NOTES = {
    "steps": f". Time: each minibatch is K bilevel iterations of T + 1 passes; {_CPU_TIME}; on a GPU "
             "200 minibatches at 512 px are the intended run (goal: 2 minutes on an H100; not yet measured)",
    "resolution": f". Time grows with the square of it: {_CPU_TIME}; 512 px is SD-1.5's own size, for a GPU",
}


def _bank_ui(bank, text: str, **extra) -> dict:
    """What the bank nodes show: the info text and the js panel's data."""
    return {"text": [text], "seqlora_bank": [{**operations.panel_data(bank), **extra}]}


class TrainConcept(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SeqLoRATrainConcept", display_name="Train Concept (SeqLoRA)", category=CATEGORY,
            description="Teach the loaded SD-1.5 one new concept from reference images, orthogonal to every "
                        "concept already in the bank (bilevel training, exact null-space projection).",
            inputs=[
                io.Model.Input("model", tooltip="the SD-1.5 model to train on (from Load Checkpoint)"),
                io.Clip.Input("clip", tooltip="its text encoder; the concept's token embedding is learned in it"),
                io.Vae.Input("vae", tooltip="its VAE, to encode the reference images"),
                io.Image.Input("images", tooltip="reference images of the concept (a batch; any size, "
                                                 "centre-cropped and resized to the resolution)"),
                io.String.Input("token", default="<my-concept>",
                                tooltip="the word to use in prompts, e.g. <chelsea> (letters, digits, _ or -)"),
                io.String.Input("init_word", default="object",
                                tooltip="a word close to the concept (cat, mug, person); the token starts from it"),
                BasisBank.Input("bank", optional=True, tooltip="bank to extend; none starts a new one for this model"),
                *(_setting_input(s) for s in TRAINING_SETTINGS),
                io.Boolean.Input("allow_other_base", default=False, optional=True,
                                 tooltip="use a bank made for another base model anyway (its concepts may look wrong)"),
                io.Int.Input("sample_steps", default=20, min=0, max=100, optional=True,
                             tooltip="sampler steps of the preview image of the new concept at the end (0: none)"),
                io.Boolean.Input("forecast", default=True, optional=True,
                                 tooltip="before training, one pass over the images forecasts how much of each "
                                         "concept in the bank the new one can disturb; after, the measured "
                                         "interference (in the panel and the forecast output)"),
                # last, so that workflows saved before masks existed keep their widget values in place
                io.Mask.Input("mask", optional=True,
                              tooltip="train on the subject, not the background: one mask, or one per image, "
                                      "read as mask_means says (Load Image's and Load Image Folder's MASK of a "
                                      "PNG with a transparent background works as it is)"),
                io.Combo.Input("mask_means", options=list(operations.MASK_MEANINGS),
                               default=operations.MASK_MEANINGS[0], optional=True,
                               tooltip="what a mask value of 1 marks: background, the part to ignore (ComfyUI's "
                                       "Load Image: 1 where transparent), or subject (segmentation nodes: 1 on "
                                       "the subject)"),
                io.Boolean.Input("quick_on_cpu", default=True, optional=True,
                                 tooltip=f"when ComfyUI runs on the CPU, train a quick first run instead: at most "
                                         f"{operations.QUICK_CPU_RESOLUTION} px and {operations.QUICK_CPU_STEPS} "
                                         f"minibatches (about 3 minutes on 2 cores; the settings as set would take "
                                         f"hours). It shows the workflow working; the concept is barely learned. "
                                         f"On a GPU it changes nothing. Off: train as set"),
            ],
            outputs=[BasisBank.Output(display_name="bank", tooltip="the bank with the new concept appended"),
                     io.Model.Output(display_name="model", tooltip="the model with every concept of the bank applied"),
                     io.Clip.Output(display_name="clip", tooltip="the text encoder with every concept token usable"),
                     io.Image.Output(display_name="loss_curve", tooltip="the denoising loss per step"),
                     io.Image.Output(display_name="sample", tooltip="'a photo of <token>' on the new model "
                                                                    "(black when sample_steps is 0)"),
                     io.String.Output(display_name="forecast",
                                      tooltip="the forecast before training and the new concept's measured "
                                              "interference row and column after (empty when forecast is off), "
                                              "after the quick CPU run's note when there is one")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, token=None, init_word=None):
        return validation.first_problem(validation.token_problem(token), validation.init_word_problem(init_word))

    @classmethod
    def execute(cls, model, clip, vae, images, token, init_word, bank=None, allow_other_base=False, sample_steps=20,
                forecast=True, mask=None, mask_means=operations.MASK_MEANINGS[0], quick_on_cpu=True,
                **setting_values):
        import comfy.utils

        settings, note = train_settings(setting_values), ""
        if quick_on_cpu and operations.runs_on_cpu():
            settings, note = operations.quick_cpu_settings(settings)
        if note:
            log.warning("SeqLoRA: %s", note)
        steps = settings.steps
        bar = comfy.utils.ProgressBar(steps)
        node = cls.hidden.unique_id if cls.hidden else None
        last = {"step": 0}

        def progress(step, total, loss):
            bar.update_absolute(step, total)
            last["step"] = step
            send("seqlora.progress", {"node": node, "step": step, "total": total, "loss": loss})

        def show_forecast(text):
            send("seqlora.forecast", {"node": node, "text": f"{note}\n\n{text}" if note else text})

        if note and not forecast:
            send("seqlora.forecast", {"node": node, "text": note})

        try:
            new_bank, new_model, new_clip, curve, report = operations.train(
                model, clip, vae, images, token, init_word, bank, settings, progress, allow_other_base,
                forecast=bool(forecast), on_forecast=show_forecast, mask=mask, mask_means=mask_means)
        except BaseException as exc:
            send("seqlora.stopped", {"node": node, "step": last["step"], "total": steps,
                                     "state": "cancelled" if operations.is_cancel(exc) else "failed"})
            raise
        sample = operations.preview(new_model, new_clip, vae, new_bank.concepts[-1].token, settings.resolution,
                                    sample_steps, settings.seed)
        report = f"{note}\n\n{report}" if note and report else report or note
        send("seqlora.bank", {"node": node, **operations.panel_data(new_bank), **({"report": report} if report else {})})
        return io.NodeOutput(new_bank, new_model, new_clip, curve, sample, report)


class LoadImageFolder(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        from seqlora_core.app.images import FITS

        from .image_folder import image_folders

        return io.Schema(
            node_id="SeqLoRALoadImageFolder", display_name="Load Image Folder (SeqLoRA)", category=CATEGORY,
            description="Every image of a folder under ComfyUI's input/ as one batch of squares, for Train Concept "
                        "(photos of any size; put a concept's photos in input/<name>/).",
            inputs=[io.Combo.Input("folder", options=image_folders(_input_dir()),
                                   tooltip="a folder inside ComfyUI's input folder"),
                    io.Int.Input("size", default=512, min=64, max=2048, step=64,
                                 tooltip="side of the square each photo becomes (use the training resolution)"),
                    io.Combo.Input("fit", options=list(FITS), default="crop",
                                   tooltip="crop: fill the square, cut the longer side; pad: keep the whole photo, "
                                           "grey bars; stretch: ignore the aspect ratio")],
            outputs=[io.Image.Output(display_name="images", tooltip="the photos as one IMAGE batch"),
                     io.Int.Output(display_name="count", tooltip="how many photos were loaded"),
                     io.Mask.Output(display_name="mask",
                                    tooltip="1 where a photo is transparent, like Load Image's MASK (0 for photos "
                                            "without transparency): wire it to Train Concept's mask to train on "
                                            "the subject only")],
        )

    @classmethod
    def fingerprint_inputs(cls, folder=None, size=None, fit=None):
        from pathlib import Path

        path = Path(_input_dir()) / (folder or "")
        files = sorted(path.glob("*")) if path.is_dir() else []
        return folder, size, fit, [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()]

    @classmethod
    def execute(cls, folder, size, fit):
        from comfy_api.latest import ui

        from .image_folder import load_folder

        images, mask = load_folder(_input_dir(), folder, size, fit)
        return io.NodeOutput(images, images.shape[0], mask, ui=ui.PreviewImage(images, cls=cls))


def _input_dir() -> str:
    import folder_paths

    return folder_paths.get_input_directory()


class LoadBasisBank(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SeqLoRALoadBasisBank", display_name="Load Basis Bank", category=CATEGORY,
            description="Load a SeqLoRA bank from models/seqlora (loaded again whenever the file changes).",
            inputs=[io.Combo.Input("bank_name", options=operations.bank_files(),
                                   tooltip="a bank file in models/seqlora"),
                    io.Model.Input("model", optional=True, tooltip="refuse the bank if it was made for another base"),
                    io.Boolean.Input("allow_other_base", default=False, optional=True,
                                     tooltip="use a bank made for another base model anyway")],
            outputs=[BasisBank.Output(display_name="bank", tooltip=BANK_TIP),
                     io.String.Output(display_name="info", tooltip="what the bank holds, as text")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def fingerprint_inputs(cls, bank_name=None, model=None, allow_other_base=False):
        # the file's size, mtime and content hash: a bank changed on disk is loaded again, so a
        # later save never builds on a stale copy (that silently lost concepts)
        return operations.bank_file_identity(bank_name), allow_other_base

    @classmethod
    def execute(cls, bank_name, model=None, allow_other_base=False):
        bank = operations.load_bank_file(bank_name, model, allow_other_base)
        text = operations.info_text(bank)
        return io.NodeOutput(bank, text, ui=_bank_ui(bank, text, file=bank_name))


class SaveBasisBank(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SeqLoRASaveBasisBank", display_name="Save Basis Bank", category=CATEGORY,
            description="Save a bank into models/seqlora (atomic; an existing file is kept unless overwrite is on, "
                        "and never overwritten by a bank that lacks one of its concepts).",
            inputs=[BasisBank.Input("bank", tooltip=BANK_TIP),
                    io.String.Input("bank_name", default="my_concepts",
                                    tooltip="file name in models/seqlora (.safetensors is added)"),
                    io.Boolean.Input("overwrite", default=False,
                                     tooltip="replace an existing file of that name; off: a numbered name is used")],
            outputs=[io.String.Output(display_name="file", tooltip="the file name actually written")],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, bank_name=None):
        return validation.first_problem(validation.bank_name_problem(bank_name))

    @classmethod
    def execute(cls, bank, bank_name, overwrite):
        name = operations.save_bank_file(bank, bank_name, overwrite)
        return io.NodeOutput(name, ui=_bank_ui(bank, f"saved {name}\n" + operations.info_text(bank), file=name))


class BasisBankInfo(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SeqLoRABasisBankInfo", display_name="Basis Bank Info", category=CATEGORY,
            description="What a bank holds: concepts with their final loss, capacity used per layer, "
                        "orthogonality, the base model's fingerprint, and how much the concepts disturb one "
                        "another (interference heat map, worst layers).",
            inputs=[BasisBank.Input("bank", tooltip=BANK_TIP)],
            outputs=[io.String.Output(display_name="info", tooltip="the same report as text"),
                     io.String.Output(display_name="interference",
                                      tooltip="the interference matrix (row: affected concept, column: the one "
                                              "disturbing it), the most disturbed pair and the worst layers")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, bank):
        text = operations.info_text(bank)
        words, heat = operations.interference_info(bank)
        return io.NodeOutput(text, words, ui=_bank_ui(bank, text, **({"interference": heat} if heat else {})))


class MergeBasisBanks(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SeqLoRAMergeBasisBanks", display_name="Merge Basis Banks", category=CATEGORY,
            description="Merge banks of one base: returned leases exactly; copies extended apart are refused "
                        "unless rebase is on (later concepts made orthogonal, their A refitted).",
            inputs=[BasisBank.Input("bank_1", tooltip="the bank to merge into (its concepts come first)"),
                    BasisBank.Input("bank_2", tooltip="a returned lease or a copy extended apart"),
                    BasisBank.Input("bank_3", optional=True, tooltip="another bank to merge in"),
                    BasisBank.Input("bank_4", optional=True, tooltip="another bank to merge in"),
                    io.Boolean.Input("rebase", default=False,
                                     tooltip="make overlapping later concepts orthogonal (their A refitted) "
                                             "instead of refusing the merge"),
                    io.String.Input("renames", default="", tooltip="old=new, … for an id two banks hold with different contents")],
            outputs=[BasisBank.Output(display_name="bank", tooltip="the merged bank"),
                     io.String.Output(display_name="info", tooltip="what the merge did, and the merged bank")],
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
            inputs=[io.Model.Input("model", tooltip="the SD-1.5 model the bank was made for"),
                    io.Clip.Input("clip", tooltip="its text encoder"),
                    BasisBank.Input("bank", tooltip=BANK_TIP),
                    io.String.Input("concepts", default="all",
                                    tooltip="all, or id:strength, … e.g. chelsea:1.0, coffee:0.8")],
            outputs=[io.Model.Output(display_name="model", tooltip="the model with the concepts added"),
                     io.Clip.Output(display_name="clip", tooltip="the text encoder; concept tokens work in prompts")],
        )

    @classmethod
    def validate_inputs(cls, concepts=None):
        return validation.first_problem(validation.selection_problem(concepts))

    @classmethod
    def execute(cls, model, clip, bank, concepts):
        ids, strengths = bank.parse_selection(concepts)
        new_model, new_clip = operations.compose(model, clip, bank, ids, strengths)
        return io.NodeOutput(new_model, new_clip)


class RemoveConcept(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SeqLoRARemoveConcept", display_name="Remove Concept (SeqLoRA)", category=CATEGORY,
            description="A copy of the bank without one concept (its capacity is freed); save it to keep it.",
            inputs=[BasisBank.Input("bank", tooltip=BANK_TIP),
                    io.String.Input("concept", default="", tooltip="the concept's id or token, e.g. chelsea or <chelsea>")],
            outputs=[BasisBank.Output(display_name="bank", tooltip="the bank without that concept")],
        )

    @classmethod
    def validate_inputs(cls, concept=None):
        return validation.first_problem(validation.token_problem(concept))

    @classmethod
    def execute(cls, bank, concept):
        smaller = operations.remove_concept(bank, concept)
        return io.NodeOutput(smaller, ui=_bank_ui(smaller, operations.info_text(smaller)))


class ExportLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SeqLoRAExportLoRA", display_name="Export LoRA (SeqLoRA)", category=CATEGORY,
            description="Write concepts as one standard LoRA into models/loras (for the stock Load LoRA node and "
                        "other tools) and their token embeddings into models/embeddings/<name>/.",
            inputs=[BasisBank.Input("bank", tooltip=BANK_TIP),
                    io.String.Input("concepts", default="all", tooltip="all, or ids separated by commas"),
                    io.String.Input("lora_name", default="seqlora_concepts",
                                    tooltip="file name in models/loras (.safetensors is added)"),
                    io.Boolean.Input("overwrite", default=False,
                                     tooltip="replace an existing LoRA of that name; off: a numbered name is used")],
            outputs=[io.String.Output(display_name="file", tooltip="the LoRA file written, and how to use the tokens")],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, lora_name=None):
        # ComfyUI attaches what validate_inputs returns to every input it takes, so this checks the
        # name alone (a bad name marks lora_name only); the concept list is checked when it runs
        return validation.first_problem(validation.lora_name_problem(lora_name))

    @classmethod
    def execute(cls, bank, concepts, lora_name, overwrite):
        text = operations.export_lora_file(bank, concepts, lora_name, overwrite)
        return io.NodeOutput(text, ui={"text": [text]})


class ImportLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SeqLoRAImportLoRA", display_name="Import LoRA into Bank", category=CATEGORY,
            description="Bring a LoRA you own (kohya, diffusers or peft file in models/loras) into a bank as a "
                        "concept orthogonal to the bank's others, so that it composes without blending; the "
                        "info output says how much of the LoRA the import had to give up.",
            inputs=[io.Model.Input("model", tooltip="the SD-1.5 model the LoRA was made for (from Load Checkpoint)"),
                    io.Clip.Input("clip", tooltip="its text encoder: the trigger words' features weight the fit"),
                    io.Combo.Input("lora_name", options=operations.lora_files(),
                                   tooltip="the LoRA file, from models/loras"),
                    io.String.Input("token", default="<my-lora>",
                                    tooltip="the concept's token in prompts, e.g. <hero> (letters, digits, _ or -)"),
                    io.String.Input("trigger", default="",
                                    tooltip="the LoRA's trigger words; empty: the file's most frequent caption tag"),
                    io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.05,
                                   tooltip="folded into the concept (compose at 1.0 afterwards)"),
                    io.Int.Input("rank", default=0, min=0, max=1024,
                                 tooltip="the concept's rank; 0: the bank's (4 for a new bank). A LoRA of higher "
                                         "rank is cut to it"),
                    BasisBank.Input("bank", optional=True, tooltip="bank to extend; none starts a new one for this model"),
                    io.Image.Input("images", optional=True,
                                   tooltip="images of the concept (optional): every layer's fit weighted by them and "
                                           "the token learned (100 steps)"),
                    io.Vae.Input("vae", optional=True, tooltip="the VAE, needed only with images"),
                    io.Boolean.Input("allow_other_base", default=False, optional=True,
                                     tooltip="use a bank made for another base model anyway")],
            outputs=[BasisBank.Output(display_name="bank", tooltip="the bank with the imported concept appended"),
                     io.Model.Output(display_name="model", tooltip="the model with every concept of the bank applied"),
                     io.Clip.Output(display_name="clip", tooltip="the text encoder with every concept token usable"),
                     io.String.Output(display_name="info", tooltip="what the import cost, per layer and in all")],
        )

    @classmethod
    def validate_inputs(cls, token=None):
        return validation.first_problem(validation.token_problem(token))

    @classmethod
    def execute(cls, model, clip, lora_name, token, trigger, strength, rank, bank=None, images=None, vae=None,
                allow_other_base=False):
        new_bank, new_model, new_clip, report = operations.import_lora_file(
            model, clip, vae, lora_name, token, trigger, strength, rank, bank, images, allow_other_base)
        text = report + "\n" + operations.info_text(new_bank)
        return io.NodeOutput(new_bank, new_model, new_clip, text, ui=_bank_ui(new_bank, text))


class RegionalConcepts(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SeqLoRARegionalConcepts", display_name="Regional Concepts", category=CATEGORY,
            description="Give regions of the image their own prompts (e.g. one concept per box): inside each "
                        "region the cross-attention reads that region's prompt, elsewhere the global one. "
                        "Chain ControlNet / T2I-Adapter (sketch, keypose) on the conditioning as usual.",
            inputs=[io.Model.Input("model", tooltip="the composed model; with a bank and residuals=confined, "
                                                     "the model straight from the checkpoint loader"),
                    io.Clip.Input("clip", tooltip="the composed CLIP, so concept tokens work (with a bank and "
                                                  "residuals=confined: the checkpoint's CLIP)"),
                    io.String.Input("regions", multiline=True,
                                    default='{"width": 512, "height": 512, "regions": []}',
                                    tooltip="boxes and prompts; drawn with the box editor on the node"),
                    io.Mask.Input("mask_1", optional=True, tooltip="a region given as a mask instead of a box"),
                    io.String.Input("mask_1_prompt", default="", optional=True, tooltip="the prompt inside mask_1"),
                    io.Mask.Input("mask_2", optional=True, tooltip="a second region given as a mask"),
                    io.String.Input("mask_2_prompt", default="", optional=True, tooltip="the prompt inside mask_2"),
                    BasisBank.Input("bank", optional=True,
                                    tooltip="with residuals=confined: the bank whose concepts the region prompts "
                                            "name; then connect model and clip straight from the checkpoint loader"),
                    io.Combo.Input("residuals", options=list(RESIDUAL_MODES), default=DEFAULT_RESIDUALS, optional=True,
                                   tooltip="confined (with a bank): each region's prompt and its keys and values "
                                           "get only the concepts it names, so two characters do not blend; "
                                           "global: the model's composed concepts act on every prompt"),
                    FoundRegions.Input("found_regions", optional=True,
                                       tooltip="regions from Find Concept Regions (one per concept, no drawing); "
                                               "boxes and masks drawn here win where they overlap")],
            outputs=[io.Model.Output(display_name="model", tooltip="the model with regional cross-attention")],
        )

    @classmethod
    def validate_inputs(cls, regions=None):
        return validation.first_problem(validation.regions_problem(regions))

    @classmethod
    def execute(cls, model, clip, regions, mask_1=None, mask_1_prompt="", mask_2=None, mask_2_prompt="", bank=None,
                residuals=DEFAULT_RESIDUALS, found_regions=None):
        from seqlora_core.sampling.auto_regions import cut_out
        from seqlora_core.sampling.regions import Region

        from .regional import apply_regions, parse_regions_json

        boxes, width, height = parse_regions_json(regions)
        for mask, prompt in ((mask_1, mask_1_prompt), (mask_2, mask_2_prompt)):
            if mask is not None and prompt.strip():
                boxes.append(Region(prompt.strip(), mask=mask[0].float().cpu()))
        if found_regions:
            boxes += cut_out(found_regions, boxes, (height, width))
        operations.check_model(model)
        if bank is not None:
            bank = operations.check_bank_for(bank, model)
        return io.NodeOutput(apply_regions(model, clip, boxes, width, height, bank, residuals))


class FindConceptRegions(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        import comfy.samplers

        return io.Schema(
            node_id="SeqLoRAFindConceptRegions", display_name="Find Concept Regions", category=CATEGORY,
            description="Regions without drawing: samples the first quarter of the steps with every concept the "
                        "prompt names and reads where each concept's token attends; one region per concept for "
                        "Regional Concepts, and their masks to preview. Refuses in one sentence when two concepts "
                        "attend to the same place (draw boxes then). Use the seed and sampler of your KSampler.",
            inputs=[io.Model.Input("model", tooltip="the model straight from the checkpoint loader"),
                    io.Clip.Input("clip", tooltip="the CLIP straight from the checkpoint loader"),
                    BasisBank.Input("bank", tooltip="the bank whose concepts the prompt names by their tokens"),
                    io.String.Input("prompt", multiline=True, default="a photo of <chelsea> and <coffee>",
                                    tooltip="the prompt of the picture, naming two or more concepts by their tokens"),
                    io.String.Input("negative", multiline=True, default="", tooltip="the negative prompt"),
                    io.Latent.Input("latent", tooltip="the latent the KSampler will start from (its size)"),
                    io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=False,
                                 tooltip="the KSampler's seed: the regions are found on the same noise"),
                    io.Int.Input("steps", default=20, min=1, max=10000,
                                 tooltip="the KSampler's steps; the first quarter of them are sampled here"),
                    io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1, tooltip="the KSampler's cfg"),
                    io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS,
                                   tooltip="the KSampler's sampler"),
                    io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS,
                                   tooltip="the KSampler's scheduler")],
            outputs=[FoundRegions.Output(display_name="found_regions",
                                         tooltip="one region per concept: the whole prompt with that concept only"),
                     io.Mask.Output(display_name="masks", tooltip="each concept's region, one mask per concept "
                                                                  "(connect a MaskPreview node to look at them)")],
        )

    @classmethod
    def execute(cls, model, clip, bank, prompt, negative, latent, seed, steps, cfg, sampler_name, scheduler):
        from .auto_regions import find_regions

        regions, masks = find_regions(model, clip, bank, prompt, negative, latent, seed, steps, cfg, sampler_name,
                                      scheduler)
        return io.NodeOutput(regions, masks)


class DrawKeypose(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SeqLoRADrawKeypose", display_name="Draw Keypose (SeqLoRA)", category=CATEGORY,
            description="Draw an OpenPose-style keypose image from keypoints (OpenPose JSON) for a keypose "
                        "T2I-Adapter or ControlNet.",
            inputs=[io.String.Input("keypoints", multiline=True,
                                    default='{"people": [{"pose_keypoints_2d": []}]}',
                                    tooltip='OpenPose JSON: {"people": [{"pose_keypoints_2d": [x, y, c, …]}]}'),
                    io.Int.Input("width", default=512, min=64, max=4096, step=8, tooltip="image width in pixels"),
                    io.Int.Input("height", default=512, min=64, max=4096, step=8, tooltip="image height in pixels")],
            outputs=[io.Image.Output(display_name="keypose", tooltip="the colour-coded skeleton on black")],
        )

    @classmethod
    def validate_inputs(cls, keypoints=None):
        return validation.first_problem(validation.keypoints_problem(keypoints))

    @classmethod
    def execute(cls, keypoints, width, height):
        import numpy as np
        import torch

        from seqlora_core.sampling.keypose import draw_keypose

        image = draw_keypose(validation.parse_keypoints(keypoints), width, height).astype(np.float32) / 255.0
        return io.NodeOutput(torch.from_numpy(image)[None])


NODES = [TrainConcept, LoadImageFolder, LoadBasisBank, SaveBasisBank, BasisBankInfo, MergeBasisBanks, ComposeConcepts,
         RemoveConcept, ExportLoRA, RegionalConcepts, FindConceptRegions, DrawKeypose, ImportLoRA]
