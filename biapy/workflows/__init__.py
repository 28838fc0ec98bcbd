"""Workflows: one class per problem, sharing `Workflow`'s data, training and test machinery."""


def get_workflow(cfg):
    if cfg.PROBLEM.TYPE == "SEMANTIC_SEG":
        from biapy.workflows.segmentation import SegmentationWorkflow
        return SegmentationWorkflow
    if cfg.PROBLEM.SELF_SUPERVISED.PRETEXT_TASK == "masking":
        from biapy.workflows.masking import MaskingWorkflow
        return MaskingWorkflow
    from biapy.workflows.crappify import CrappifyWorkflow
    return CrappifyWorkflow
