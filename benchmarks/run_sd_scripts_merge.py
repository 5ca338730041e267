"""Run kohya-ss/sd-scripts' real ``networks/merge_lora.py`` in this environment (benchmark use only).

    python benchmarks/run_sd_scripts_merge.py SD_SCRIPTS_DIR [networks/flux_merge_lora.py] [its arguments ...]

(the script defaults to ``networks/merge_lora.py``; bench_dit.py runs ``networks/flux_merge_lora.py``.)

Shims, none on the merge path: modules sd-scripts imports at top level but never calls while merging
(torchvision, cv2, imagesize, voluptuous: not installed here) are stubbed after diffusers and
transformers have loaded; ``CLIPFeatureExtractor`` (removed in transformers 5) is an alias of
``CLIPImageProcessor``; and transformers 5's ``CLIPTextModel`` no longer nests its modules under
``text_model.``, which sd-scripts' loader, its LoRA module names and its writer all expect, so its text
encoder is wrapped in a module that does (transformers 4's layout).
"""

import runpy
import sys
import types

import diffusers  # noqa: F401  (imported before the stubs: they must not see a fake torchvision)
import torch
import transformers
from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: F401
from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer  # noqa: F401

root = sys.argv[1]
sys.path[:0] = [root, f"{root}/networks"]


class _Any(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Any(name)

    def __call__(self, *args, **kwargs):
        return _Any("stub")


for name in ("torchvision", "torchvision.transforms", "cv2", "imagesize", "voluptuous"):
    sys.modules[name] = _Any(name)


class _TransformersV4(types.ModuleType):
    """transformers with the names sd-scripts imports from it, for the duration of its imports."""

    CLIPFeatureExtractor = CLIPImageProcessor

    def __getattr__(self, name):
        return getattr(transformers, name)


class CLIPTextModelV4(torch.nn.Module):
    """transformers 4's module layout: everything under ``text_model.``."""

    def __init__(self, config):
        super().__init__()
        self.text_model = CLIPTextModel._from_config(config)

    @classmethod
    def _from_config(cls, config):
        return cls(config)


sys.modules["transformers"] = _TransformersV4("transformers")
import library.model_util as model_util  # noqa: E402
import library.train_util  # noqa: E402,F401  (imports CLIPFeatureExtractor)

sys.modules["transformers"] = transformers

model_util.CLIPTextModel = CLIPTextModelV4
script, rest = ((sys.argv[2], sys.argv[3:]) if sys.argv[2:3] and sys.argv[2].endswith(".py")
                else ("networks/merge_lora.py", sys.argv[2:]))  # fmt: skip
sys.argv = [f"{root}/{script}", *rest]
runpy.run_path(sys.argv[0], run_name="__main__")
