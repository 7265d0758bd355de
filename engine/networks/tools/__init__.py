"""Tools for kohya LoRA files (``python -m engine lora ...``): inspect, merge (into a model or into one LoRA),
resize and extract. One module per tool; :mod:`.lora_file` (reading, formats, writing new files only),
:mod:`.factorize` (SVD and ranks), :mod:`.metadata_keys`, :mod:`.model_layers` and :mod:`.lora_family` (a LoRA's
family from its names and metadata) are shared. Families whose models are separate files (FLUX.1, Chroma, SD3:
``FamilyInfo.loader`` in :data:`.model_files.FILE_MODELS`) are merged into and extracted from tensor by tensor
(:mod:`.merge_files`, :mod:`.extract_files`), the others through the loaded model.
"""

from engine.networks.tools.extract import extract_lora
from engine.networks.tools.extract_report import ExtractReport
from engine.networks.tools.inspect_file import InspectReport, inspect_network_file
from engine.networks.tools.lora_file import LoRASource, ToolError, parse_lora_source
from engine.networks.tools.merge import LoRAMergeReport, merge_loras
from engine.networks.tools.merge_model import merge_into_model
from engine.networks.tools.merge_model_report import ModelMergeReport
from engine.networks.tools.resize import ResizeReport, resize_lora

__all__ = [
    "ExtractReport",
    "InspectReport",
    "LoRAMergeReport",
    "LoRASource",
    "ModelMergeReport",
    "ResizeReport",
    "ToolError",
    "extract_lora",
    "inspect_network_file",
    "merge_into_model",
    "merge_loras",
    "parse_lora_source",
    "resize_lora",
]
