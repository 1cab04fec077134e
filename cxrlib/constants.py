"""Constants of the M4CXR recipe: special tokens, prompt strings and label names.

Every string here is copied from the paper's conversation format (summarised in ``docs/paper.md``),
so that the data layer, the model and the evaluation agree on one spelling.
"""

IGNORE_INDEX = -100  # label value that the cross-entropy loss skips (non-assistant tokens)
IMAGE_TOKEN = "<image>"  # placeholder; expanded to ``projector.num_queries`` positions per image

# Mistral chat markers (the card: ``<s>[INST] {user} [/INST]{assistant}</s>``).
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
UNK_TOKEN = "<unk>"
PAD_TOKEN = "<pad>"
INST_OPEN = "[INST]"
INST_CLOSE = "[/INST]"

SYSTEM_TEXT = (
    "The following is a conversation between a curious human and an AI medical assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

# The 14 CheXpert observations, in CheXpert's order.
CHEXPERT_LABELS = [
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
]

# The 13 findings the chain-of-thought turn asks about, lowercase, in the card's order.
COT_FINDINGS = [
    "enlarged cardiomediastinum",
    "cardiomegaly",
    "lung opacity",
    "lung lesion",
    "edema",
    "consolidation",
    "pneumonia",
    "atelectasis",
    "pneumothorax",
    "pleural effusion",
    "pleural other",
    "fracture",
    "support devices",
]

# A finding's lowercase name (as the CoT answer spells it) -> its CheXpert label.
LABEL_OF = {name.lower(): name for name in CHEXPERT_LABELS}

# The 5 labels of mF1-5 / uF1-5.
FIVE_LABELS = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]

# Label values used throughout (CheXpert convention; "blank" is represented as None / NaN).
POSITIVE, NEGATIVE, UNCERTAIN = 1, 0, -1

# Organs the grounding tasks ask about.
ORGANS = ["left lung", "right lung", "heart"]

FRONTAL_VIEWS = ("PA", "AP")
LATERAL_VIEW = "LATERAL"

# Task names (one per conversation format of the card). Groups drive the mixture sampler.
TASK_GROUPS = {
    "report": [
        "cot_single",
        "cot_multi_image",
        "cot_multi_study",
    ],
    "classification": [
        "single_disease",
        "multi_label",
    ],
    "localization": [
        "finding_grounding",
        "grounded_finding",
        "multi_finding_grounding",
        "abnormality_detection",
        "organ_grounding",
        "grounded_organ",
        "phrase_grounding",
        "grounded_phrase",
    ],
    "vqa": [
        "vqa",
        "difference_vqa",
    ],
}
# Tasks outside the phase-2 mixture: phase-1 pairs and the no-CoT ablation (notebook 08): the
# direct single-turn report prompt in the three input modes of the CoT report tasks.
DIRECT_REPORT_TASKS = ("direct_report", "direct_multi_image", "direct_multi_study")
EXTRA_TASKS = ["report_only", *DIRECT_REPORT_TASKS]
# Every task, and the tasks of the phase-2 mixture (all groups; not phase 1 or the ablation).
MIXTURE_TASKS = [t for group in TASK_GROUPS.values() for t in group]
ALL_TASKS = MIXTURE_TASKS + list(EXTRA_TASKS)

# The notebook that makes each artifact: every "run notebook NN first" message reads this table.
NOTEBOOKS = {
    "overview": "00-overview",
    "data": "01-data-prep",
    "backbones": "02-backbones",  # tokenizer, small LM and encoder (or the paper's, checked)
    "phase1": "03-projector-pretraining",
    "phase2": "04-instruction-tuning-lora",
    "inference": "05-cot-inference",
    "evaluation": "06-evaluation",
    "explorer": "07-explorer",
}

# The parts of the model that ``train.<phase>.trainable`` may name (``cxrlib.model.set_trainable``).
TRAINABLE_PARTS = ("projector", "lora", "encoder", "llm")

# The linear layers of a Mistral decoder block that ``lora.target_modules`` may name (attention
# q/k/v/o and the gated MLP); tests check this against the modules of a built model.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# The real datasets with an adapter (``cxrlib.data.sources``; keys of ``data.roots``).
# The sources whose studies have written reports (phase-1 pairs, the small LM's corpus).
REPORT_SOURCES = ("iu", "mimic_cxr")
REAL_SOURCES = ("mimic_cxr", "ms_cxr", "nih", "chexpert", "rsna", "siim", "vindr", "chestx_det10",
                "covid19_radiography", "brax", "slake", "mimic_cxr_vqa",
                "medical_diff_vqa", "radialog", "chest_imagenome", "covid_qu_ex")  # fmt: skip
