"""The default configuration: every key this tool reads, each commented where it is defined.

Key names follow BiaPy's so that a BiaPy YAML runs unchanged. Keys marked (new) are ours.
Derived values (paths of the results tree, "-1 = automatic" choices) are filled in by
`biapy.config.derived.finalize`, SYSTEM.DEVICE by the runner from --gpu; a YAML file leaves them alone.
They are written to the run's config.yaml so that it tells what the run used.
"""
from yacs.config import CfgNode as CN

_C = CN()

# --------------------------------------------------------------------------------------------
# SYSTEM: hardware and reproducibility
# --------------------------------------------------------------------------------------------
_C.SYSTEM = CN()
# CPU cores the job may use, shared by its processes on this machine (torchrun); -1 = all it may run on.
_C.SYSTEM.NUM_CPUS = -1
# DataLoader worker processes per rank; -1 = automatic: min(its cores - 1, 4), 0 if it has 1-2 cores.
_C.SYSTEM.NUM_WORKERS = -1
# Base random seed; rank r uses SEED + r for data sampling/augmentation, the model starts identical.
_C.SYSTEM.SEED = 0
# Device set by --gpu ("cuda:0", "cpu"); derived, do not set it in a YAML.
_C.SYSTEM.DEVICE = ""
# Pin host memory in the training and validation DataLoaders when training on a GPU (faster copies).
_C.SYSTEM.PIN_MEM = True

# --------------------------------------------------------------------------------------------
# PROBLEM: what to learn
# --------------------------------------------------------------------------------------------
_C.PROBLEM = CN()
# Workflow: SELF_SUPERVISED (pretraining) or SEMANTIC_SEG (downstream fine-tuning).
_C.PROBLEM.TYPE = "SELF_SUPERVISED"
# Spatial dimensionality of the images: 2D (y,x,c) or 3D (z,y,x,c).
_C.PROBLEM.NDIM = "2D"

_C.PROBLEM.SELF_SUPERVISED = CN()
# Pretext task: 'crappify' (restore degraded images) or 'masking' (reconstruct hidden regions).
_C.PROBLEM.SELF_SUPERVISED.PRETEXT_TASK = "crappify"
# crappify: down-sampling factor of the image area (each spatial axis shrinks to int(size / sqrt(it))); 2, 4 or 6.
_C.PROBLEM.SELF_SUPERVISED.RESIZING_FACTOR = 4
# crappify: std of the added Gaussian noise as a fraction of each channel's maximum; 0 disables noise.
_C.PROBLEM.SELF_SUPERVISED.NOISE = 0.2
# masking with a CNN (unet/resunet) (new): side in pixels of the square/cubic blocks that are hidden.
_C.PROBLEM.SELF_SUPERVISED.MASK_BLOCK_SIZE = 8
# masking (new): compute the loss on hidden regions only (True, as MAE) or on the whole image.
_C.PROBLEM.SELF_SUPERVISED.LOSS_ON_MASKED_ONLY = True
# masking (new): each token's target at zero mean, unit variance (MAE norm_pix_loss); outputs mapped back per token.
_C.PROBLEM.SELF_SUPERVISED.NORM_PIX_LOSS = False

_C.PROBLEM.SEMANTIC_SEG = CN()
# Class left out of the mean IoU/Dice (0 = background, so binary tasks report the foreground);
# -1 = average every class. Per-class values are always in the CSV.
_C.PROBLEM.SEMANTIC_SEG.IGNORE_CLASS_ID = 0

# --------------------------------------------------------------------------------------------
# DATA: where images live and how patches are cut
# --------------------------------------------------------------------------------------------
_C.DATA = CN()
# Patch fed to the network: (y, x, channels) in 2D, (z, y, x, channels) in 3D.
_C.DATA.PATCH_SIZE = (256, 256, 1)
# Train/val images smaller than the patch: reflect-padded (True; not when all are) or an error (False); test: any.
_C.DATA.REFLECT_TO_COMPLETE_SHAPE = True

_C.DATA.NORMALIZATION = CN()
# 'zero_mean_unit_variance' (per image), 'div' (8/16-bit integers by their type's maximum, other types by
# 1, 255 or 65535 as each channel's maximum fits), 'scale_range' (per-image min/max to [0, 1]) or 'custom'
# (mean/std measured on the training set, saved beside the checkpoints). A 0/1 channel is kept, but by 'custom'.
_C.DATA.NORMALIZATION.TYPE = "zero_mean_unit_variance"
_C.DATA.NORMALIZATION.PERC_CLIP = CN()
# Clip each image to percentiles (or fixed values) before normalizing.
_C.DATA.NORMALIZATION.PERC_CLIP.ENABLE = False
# Lower percentile (0-100) to clip at; -1 = use LOWER_VALUE instead.
_C.DATA.NORMALIZATION.PERC_CLIP.LOWER_PERC = -1.0
# Upper percentile (0-100) to clip at; -1 = use UPPER_VALUE instead.
_C.DATA.NORMALIZATION.PERC_CLIP.UPPER_PERC = -1.0
# Fixed lower clip value(s) in input units, used when LOWER_PERC is -1; [-1.0] = none.
_C.DATA.NORMALIZATION.PERC_CLIP.LOWER_VALUE = [-1.0]
# Fixed upper clip value(s) in input units, used when UPPER_PERC is -1; [-1.0] = none.
_C.DATA.NORMALIZATION.PERC_CLIP.UPPER_VALUE = [-1.0]
_C.DATA.NORMALIZATION.ZERO_MEAN_UNIT_VAR = CN()
# Fixed mean (1 value, or one per channel) for 'zero_mean_unit_variance' and 'custom'; [-1.0] = measure it.
_C.DATA.NORMALIZATION.ZERO_MEAN_UNIT_VAR.MEAN_VAL = [-1.0]
# Fixed std (1 value, or one per channel) for 'zero_mean_unit_variance' and 'custom'; [-1.0] = measure it.
_C.DATA.NORMALIZATION.ZERO_MEAN_UNIT_VAR.STD_VAL = [-1.0]

_C.DATA.TRAIN = CN()
# Folder of training images.
_C.DATA.TRAIN.PATH = ""
# Folder of training label masks (SEMANTIC_SEG only), one per image with the same file name.
_C.DATA.TRAIN.GT_PATH = ""
# Decode every training image once into memory (True) or read only the needed patch from disk (False).
_C.DATA.TRAIN.IN_MEMORY = True
# crappify: folder for the degraded copies; "" = '<PATH>_ssl_source' beside the data folder.
_C.DATA.TRAIN.SSL_SOURCE_DIR = ""
# Draw random patches afresh every epoch (True) or walk a fixed sliding grid (False, uses OVERLAP/PADDING).
_C.DATA.TRAIN.EXTRACT_RANDOM_PATCH = True
# (new) With EXTRACT_RANDOM_PATCH, random patches per image per epoch; -1 = as many as a non-overlapping grid holds.
_C.DATA.TRAIN.PATCHES_PER_IMAGE = -1
# Sliding grid only: overlap fraction per spatial axis in [0, 1), e.g. (0, 0) or (0, 0, 0) in 3D.
_C.DATA.TRAIN.OVERLAP = (0, 0)
# Sliding grid only: pixels per spatial axis to pad each patch with context.
_C.DATA.TRAIN.PADDING = (0, 0)

_C.DATA.VAL = CN()
# Take the validation images out of the training folder (True) or read them from VAL.PATH (False).
_C.DATA.VAL.FROM_TRAIN = True
# Share moved to validation when FROM_TRAIN: ceil(n * fraction) whole images (at least one); of a single image, that share of its rows, a band at its end.
_C.DATA.VAL.SPLIT_TRAIN = 0.1
# Choose the validation images at random (seeded by SYSTEM.SEED) rather than the last ones (folds too).
_C.DATA.VAL.RANDOM = True
# k-fold cross-validation of whole training images (FROM_TRAIN): fold CROSS_VAL_FOLD validates, SPLIT_TRAIN unused.
_C.DATA.VAL.CROSS_VAL = False
# Number of disjoint folds the training images are cut into with CROSS_VAL (at least 2).
_C.DATA.VAL.CROSS_VAL_NFOLD = 5
# The fold (1-based, 1..CROSS_VAL_NFOLD) used as validation with CROSS_VAL; a run per fold covers every image.
_C.DATA.VAL.CROSS_VAL_FOLD = 1
# Folder of validation images when FROM_TRAIN is False.
_C.DATA.VAL.PATH = ""
# Folder of validation label masks (SEMANTIC_SEG, FROM_TRAIN False).
_C.DATA.VAL.GT_PATH = ""
# Keep validation images in memory (True) or read patches lazily from disk (False).
_C.DATA.VAL.IN_MEMORY = True
# crappify: folder for degraded validation copies; "" = '<PATH>_ssl_source' (FROM_TRAIN: the train one).
_C.DATA.VAL.SSL_SOURCE_DIR = ""
# Validation patches: overlap fraction per spatial axis of the fixed grid.
_C.DATA.VAL.OVERLAP = (0, 0)
# Validation patches: padding in pixels per spatial axis of the fixed grid.
_C.DATA.VAL.PADDING = (0, 0)

_C.DATA.TEST = CN()
# Folder of test images.
_C.DATA.TEST.PATH = ""
# Folder of test label masks (SEMANTIC_SEG with LOAD_GT).
_C.DATA.TEST.GT_PATH = ""
# Read every test image up front (True) or each in turn (False; 3D: read, predicted, written, scored by slabs).
_C.DATA.TEST.IN_MEMORY = False
# Score test outputs against ground truth: for SELF_SUPERVISED the original image, for SEMANTIC_SEG GT_PATH.
_C.DATA.TEST.LOAD_GT = True
# crappify: folder for degraded test copies; "" = '<PATH>_ssl_source' beside the data folder.
_C.DATA.TEST.SSL_SOURCE_DIR = ""
# Whole-image prediction: overlap fraction between neighbouring patches per spatial axis.
_C.DATA.TEST.OVERLAP = (0, 0)
# Whole-image prediction: pixels per spatial axis discarded at each patch border (context padding).
_C.DATA.TEST.PADDING = (0, 0)

# --------------------------------------------------------------------------------------------
# AUGMENTOR: data augmentation of training patches (geometric ones identical on input and target;
# intensity ones, blur and noise on the input only)
# --------------------------------------------------------------------------------------------
_C.AUGMENTOR = CN()
# Turn augmentation on.
_C.AUGMENTOR.ENABLE = False
# Probability of applying each enabled transform to a patch, unless its own <NAME>_PROB is set.
_C.AUGMENTOR.DA_PROB = 0.5
# Write AUG_NUM_SAMPLES augmented patches to results/NAME_ID/aug/ before training.
_C.AUGMENTOR.AUG_SAMPLES = True
# How many augmented patches to write when AUG_SAMPLES is on.
_C.AUGMENTOR.AUG_NUM_SAMPLES = 10
# Flip along y.
_C.AUGMENTOR.VFLIP = False
# Probability of VFLIP per patch (BiaPy 3.7's key); -1 = DA_PROB.
_C.AUGMENTOR.VFLIP_PROB = -1.0
# Flip along x.
_C.AUGMENTOR.HFLIP = False
# Probability of HFLIP per patch (BiaPy 3.7's key); -1 = DA_PROB.
_C.AUGMENTOR.HFLIP_PROB = -1.0
# Flip along z (3D only).
_C.AUGMENTOR.ZFLIP = False
# Probability of ZFLIP per patch (BiaPy 3.7's key); -1 = DA_PROB.
_C.AUGMENTOR.ZFLIP_PROB = -1.0
# Rotate by a multiple of 90 degrees in the y-x plane.
_C.AUGMENTOR.ROT90 = False
# Probability of ROT90 per patch (BiaPy 3.7's key); -1 = DA_PROB.
_C.AUGMENTOR.ROT90_PROB = -1.0
# Rotate by an arbitrary angle in the y-x plane (reflect at borders; nearest-neighbour for labels).
_C.AUGMENTOR.RANDOM_ROT = False
# Probability of RANDOM_ROT per patch (BiaPy 3.7's key); -1 = DA_PROB.
_C.AUGMENTOR.RANDOM_ROT_PROB = -1.0
# Range of angles in degrees for RANDOM_ROT.
_C.AUGMENTOR.RANDOM_ROT_RANGE = (-180, 180)
# Add a random offset to intensities (input only).
_C.AUGMENTOR.BRIGHTNESS = False
# Probability of BRIGHTNESS per patch (BiaPy 3.7's key); -1 = DA_PROB.
_C.AUGMENTOR.BRIGHTNESS_PROB = -1.0
# Offset range for BRIGHTNESS, as a fraction of the patch's value range.
_C.AUGMENTOR.BRIGHTNESS_FACTOR = (-0.1, 0.1)
# Scale contrast around the mean (input only).
_C.AUGMENTOR.CONTRAST = False
# Probability of CONTRAST per patch (BiaPy 3.7's key); -1 = DA_PROB.
_C.AUGMENTOR.CONTRAST_PROB = -1.0
# Multiplier range for CONTRAST (1 + factor).
_C.AUGMENTOR.CONTRAST_FACTOR = (-0.1, 0.1)
# Apply a gamma curve to intensities (input only).
_C.AUGMENTOR.GAMMA_CONTRAST = False
# Probability of GAMMA_CONTRAST per patch (BiaPy 3.7's key); -1 = DA_PROB.
_C.AUGMENTOR.GAMMA_CONTRAST_PROB = -1.0
# Gamma range for GAMMA_CONTRAST.
_C.AUGMENTOR.GC_GAMMA = (1.25, 1.75)
# Add Gaussian noise (input only).
_C.AUGMENTOR.GAUSSIAN_NOISE = False
# Probability of GAUSSIAN_NOISE per patch (BiaPy 3.7's key); -1 = DA_PROB.
_C.AUGMENTOR.GAUSSIAN_NOISE_PROB = -1.0
# Mean of the GAUSSIAN_NOISE, in normalized units.
_C.AUGMENTOR.GAUSSIAN_NOISE_MEAN = 0.0
# Variance of the GAUSSIAN_NOISE, in normalized units.
_C.AUGMENTOR.GAUSSIAN_NOISE_VAR = 0.01
# Gaussian blur (input only).
_C.AUGMENTOR.G_BLUR = False
# Probability of G_BLUR per patch (BiaPy 3.7's key); -1 = DA_PROB.
_C.AUGMENTOR.G_BLUR_PROB = -1.0
# Sigma range in pixels for G_BLUR.
_C.AUGMENTOR.G_SIGMA = (1.0, 2.0)

# --------------------------------------------------------------------------------------------
# MODEL: network and checkpoints to start from
# --------------------------------------------------------------------------------------------
_C.MODEL = CN()
# 'unet', 'resunet' (CNNs, both pretext tasks and segmentation), 'mae' (ViT masked autoencoder,
# masking only) or 'unetr' (ViT encoder + convolutional decoder, segmentation; takes MAE weights).
_C.MODEL.ARCHITECTURE = "unet"
# Channels per U-Net level; its length sets the depth (levels - 1 down-samplings).
_C.MODEL.FEATURE_MAPS = [16, 32, 64, 128, 256]
# Dropout per U-Net level; same length as FEATURE_MAPS.
_C.MODEL.DROPOUT_VALUES = [0.0, 0.0, 0.0, 0.0, 0.0]
# Normalization layer in CNNs: 'bn', 'in' (instance), 'gn' (group) or 'none' (BiaPy 3.7.1's default is 'in').
_C.MODEL.NORMALIZATION = "bn"
# Convolution kernel size of CNNs (odd: 3, 5, ...).
_C.MODEL.KERNEL_SIZE = 3
# Activation of CNNs: 'elu', 'relu', 'leaky_relu', 'gelu' or 'silu'.
_C.MODEL.ACTIVATION = "elu"
# 3D U-Nets only: z pooling factor per down-sampling (len(FEATURE_MAPS) - 1 values): 1 keeps z, 2 halves
# it, 0 = same as y/x. Use 1s for thin, anisotropic stacks. A ViT (mae, unetr) does not read it.
_C.MODEL.Z_DOWN = [0, 0, 0, 0]
# Output classes of SEMANTIC_SEG (2 = binary: background + foreground).
_C.MODEL.N_CLASSES = 2
# ViT (mae, unetr): token side in pixels; must divide every spatial axis of the patch.
_C.MODEL.VIT_TOKEN_SIZE = 16
# ViT encoder width.
_C.MODEL.VIT_EMBED_DIM = 768
# ViT encoder depth (transformer blocks).
_C.MODEL.VIT_NUM_LAYERS = 12
# ViT encoder attention heads; must divide VIT_EMBED_DIM.
_C.MODEL.VIT_NUM_HEADS = 12
# ViT encoder MLP width as a multiple of VIT_EMBED_DIM.
_C.MODEL.VIT_MLP_RATIO = 4.0
# ViT layer-norm epsilon.
_C.MODEL.VIT_NORM_EPS = 1e-6
# mae only: 'random' (per-sample random tokens) or 'grid' (a regular pattern); unet/resunet hide random blocks.
_C.MODEL.MAE_MASK_TYPE = "grid"
# Fraction of tokens (mae) or blocks (unet/resunet masking) hidden from the network (at least one per patch).
_C.MODEL.MAE_MASK_RATIO = 0.5
# MAE decoder width.
_C.MODEL.MAE_DEC_HIDDEN_SIZE = 512
# MAE decoder depth (transformer blocks).
_C.MODEL.MAE_DEC_NUM_LAYERS = 8
# MAE decoder attention heads; must divide MAE_DEC_HIDDEN_SIZE.
_C.MODEL.MAE_DEC_NUM_HEADS = 16
# MAE decoder MLP hidden width (absolute, as BiaPy).
_C.MODEL.MAE_DEC_MLP_DIMS = 2048
# (new) Keep only each block's input in training and run the block again in the backward pass: ~80% fewer
# saved activations (3D U-Net, ViT), steps ~1.4x slower, the same trained weights (bench/bench_recompute.py).
_C.MODEL.ACTIVATION_CHECKPOINTING = False
# Start from a checkpoint (PATHS.CHECKPOINT_FILE, or this job's own by LOAD_CHECKPOINT_EPOCH).
_C.MODEL.LOAD_CHECKPOINT = False
# (new) Load only the model weights (True) or also optimizer, scheduler and epoch to continue (False; same task only).
_C.MODEL.LOAD_CHECKPOINT_ONLY_WEIGHTS = True
# This job's checkpoint to test with, or to load when CHECKPOINT_FILE is empty: 'best_on_val' or 'last_on_train'.
_C.MODEL.LOAD_CHECKPOINT_EPOCH = "best_on_val"
# Drop checkpoint tensors whose name or shape does not fit the model (listed) instead of failing.
_C.MODEL.SKIP_UNMATCHED_LAYERS = False
# Also keep a checkpoint every N epochs (NAME_ID-checkpoint-<epoch>.pth); -1 = never.
_C.MODEL.SAVE_CKPT_FREQ = -1
# (new) Freeze the loaded encoder for this many first epochs of fine-tuning; 0 = never frozen.
_C.MODEL.FREEZE_ENCODER_EPOCHS = 0

# --------------------------------------------------------------------------------------------
# LOSS
# --------------------------------------------------------------------------------------------
_C.LOSS = CN()
# Loss: SELF_SUPERVISED 'MAE', 'MSE', 'SSIM', 'W_MAE_SSIM', 'W_MSE_SSIM'; SEMANTIC_SEG 'CE', 'DICE',
# 'CE_DICE'; masking takes 'MAE' or 'MSE' on the hidden pixels. "" = the default (crappify MAE,
# masking MSE, segmentation CE). BiaPy 3.7.1's list form too: [] , ["MAE"], ["MAE", "SSIM"], ["DICE", "CE"].
_C.LOSS.TYPE = ""
# Weights of the two terms of W_MAE_SSIM / W_MSE_SSIM / CE_DICE; [] = [0.5, 0.5].
_C.LOSS.WEIGHTS = []
# SEMANTIC_SEG: label value of unlabelled pixels (e.g. 255), left out of loss and scores; -1 = none.
_C.LOSS.IGNORE_INDEX = -1
# SEMANTIC_SEG class weights in the loss: 'none', or 'manual' (LOSS.CLASS_WEIGHTS) for rare classes.
_C.LOSS.CLASS_REBALANCE = "none"
# With CLASS_REBALANCE 'manual': one non-negative weight per class (MODEL.N_CLASSES values).
_C.LOSS.CLASS_WEIGHTS = []

# --------------------------------------------------------------------------------------------
# TRAIN
# --------------------------------------------------------------------------------------------
_C.TRAIN = CN()
# Run the training phase.
_C.TRAIN.ENABLE = True
# 'SGD', 'ADAM' or 'ADAMW'.
_C.TRAIN.OPTIMIZER = "ADAMW"
# Peak learning rate.
_C.TRAIN.LR = 1.0e-4
# Weight decay (never applied to norms and biases).
_C.TRAIN.W_DECAY = 0.02
# Adam(W) betas.
_C.TRAIN.OPT_BETAS = (0.9, 0.999)
# Patches per step per rank.
_C.TRAIN.BATCH_SIZE = 2
# (new) Accumulate gradients over this many steps before each optimizer update.
_C.TRAIN.ACCUM_ITER = 1
# Training epochs.
_C.TRAIN.EPOCHS = 360
# Stop after this many epochs without a better validation loss; -1 = never stop early.
_C.TRAIN.PATIENCE = -1
# Metrics measured on validation patches every epoch; [] = the workflow's default.
_C.TRAIN.METRICS = []
# Clip the gradient norm to this value; 0 = no clipping.
_C.TRAIN.GRADIENT_CLIP_NORM = 0.0
# (new) Mixed precision of training and test inference: 'auto' (bf16 on a GPU with native bfloat16,
# compute capability 8.0+, else fp16 with a scaler; on a CPU bf16 where it has AMX or is an AMD CPU with
# AVX-512 BF16, else off), 'bf16' (fp16 on older GPUs), 'fp16' or 'off' (YAML's bare off too).
_C.TRAIN.AMP = "auto"
# (new) Train and predict with U-Nets and UNETR in channels-last memory layout (faster convolutions on CPU and GPU).
_C.TRAIN.CHANNELS_LAST = True
# (new) Compile the model with torch.compile (slow start, faster steps on long GPU runs).
_C.TRAIN.COMPILE = False
_C.TRAIN.LR_SCHEDULER = CN()
# '' (constant), 'warmupcosine', 'reduceonplateau' or 'onecycle'.
_C.TRAIN.LR_SCHEDULER.NAME = ""
# Floor of the learning rate for 'warmupcosine' and 'reduceonplateau'; -1 = 0 / 1e-6 respectively.
_C.TRAIN.LR_SCHEDULER.MIN_LR = -1.0
# 'warmupcosine': warmup length in epochs (>= 1), or as a fraction of EPOCHS (0 < value < 1); -1 = no warmup.
_C.TRAIN.LR_SCHEDULER.WARMUP_COSINE_DECAY_EPOCHS = -1.0
# 'reduceonplateau': factor by which the LR is multiplied.
_C.TRAIN.LR_SCHEDULER.REDUCEONPLATEAU_FACTOR = 0.5
# 'reduceonplateau': epochs without improvement before reducing; -1 = automatic (max(PATIENCE//2, 2)).
_C.TRAIN.LR_SCHEDULER.REDUCEONPLATEAU_PATIENCE = -1

# --------------------------------------------------------------------------------------------
# TEST
# --------------------------------------------------------------------------------------------
_C.TEST = CN()
# Run the test phase (whole images predicted by stitched patches).
_C.TEST.ENABLE = True
# Metrics on test images; [] = the workflow's default (psnr, ssim, mae, mse / iou, dice over foreground classes).
_C.TEST.METRICS = []
# Predict each test image whole in one forward pass (mirrored up to the pooling's multiple), not by patches (CNNs only).
_C.TEST.FULL_IMG = False
# Test-time augmentation (crappify, SEMANTIC_SEG): mean over the 8 flips/turns of the Y-X plane (4 if Y != X).
_C.TEST.AUGMENTATION = False
# (new) Patches per forward pass in whole-image prediction; -1 = TRAIN.BATCH_SIZE.
_C.TEST.BATCH_SIZE = -1
# (new) Segmentation: also save class probabilities as float32 TIFFs beside the label maps.
_C.TEST.SAVE_PROBABILITIES = False

# --------------------------------------------------------------------------------------------
# PATHS: derived from --result_dir, --name and --run_id (only CHECKPOINT_FILE is set by users)
# --------------------------------------------------------------------------------------------
_C.PATHS = CN()
# A checkpoint to load when MODEL.LOAD_CHECKPOINT is on (e.g. a pretrained run's -checkpoint-best.pth).
_C.PATHS.CHECKPOINT_FILE = ""
# Derived: DIR/NAME/checkpoints.
_C.PATHS.CHECKPOINT = ""
# Derived: DIR/NAME/results/NAME_ID.
_C.PATHS.RESULT_DIR = ""
# Derived: results/NAME_ID/per_image (test outputs).
_C.PATHS.PER_IMAGE = ""
# Derived: results/NAME_ID/charts.
_C.PATHS.CHARTS = ""
# Derived: results/NAME_ID/aug (augmented samples).
_C.PATHS.DA_SAMPLES = ""
# Derived: results/NAME_ID/MAE_checks (masking reconstructions).
_C.PATHS.MAE_OUT_DIR = ""
# Derived: results/NAME_ID/train_logs.
_C.PATHS.TRAIN_LOGS = ""
# Derived: results/NAME_ID/test_results_metrics.csv.
_C.PATHS.TEST_METRICS_FILE = ""

# --------------------------------------------------------------------------------------------
# LOG
# --------------------------------------------------------------------------------------------
_C.LOG = CN()
# Redraw the loss and metric charts every N epochs (and always at the end).
_C.LOG.CHART_CREATION_FREQ = 5
# Derived: results/NAME_ID/tensorboard.
_C.LOG.TENSORBOARD_LOG_DIR = ""
# (new) masking: write MAE_checks and TensorBoard reconstruction panels every N epochs; -1 = only at the end.
_C.LOG.RECONSTRUCTION_FREQ = 5
# (new) How many fixed validation images the MAE_checks panels show (a centred crop above 1 M voxels).
_C.LOG.RECONSTRUCTION_NUM_SAMPLES = 2


def get_defaults():
    """A fresh, mutable copy of the default configuration."""
    return _C.clone()
