"""Names of the models used when the user names none (all ship inside the package).

Kept in a module of its own, with no imports, so the napari plugin can read them without
loading torch at start-up.
"""

#: Box prompts (HRMedSegSAM): nuclei and the optic disc / cup.
DEFAULT_BOX_MODEL = "hrmedseg_sam_default"
#: Prompt-free HRMedSeg models, by what they segment.
DEFAULT_PROMPT_FREE_MODELS = {"nuclei": "hrmedseg_nuclei", "fundus": "hrmedseg_fundus_disc_cup"}
