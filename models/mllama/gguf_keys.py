"""GGUF metadata keys of the vision file (and the two the text file shares), named once.

The text file is a plain `llama` GGUF and uses gguf-py's own `gguf.Keys`; everything mllama-specific
lives under the `mllama.` prefix so llama.cpp tools ignore it.
"""

ARCHITECTURE = "mllama_vision"

PAIR_ID = "mllama.pair_id"                       # shared by a text file and its vision file
TEXT_FILE = "mllama.text_file"                   # file name of the text GGUF written alongside
QUANT = "mllama.quant"                           # the --quant the pair was converted with

TEXT_EMBEDDING_LENGTH = "mllama.text.embedding_length"
TEXT_FEED_FORWARD_LENGTH = "mllama.text.feed_forward_length"
TEXT_HEAD_COUNT = "mllama.text.attention.head_count"
TEXT_HEAD_COUNT_KV = "mllama.text.attention.head_count_kv"
TEXT_RMS_EPS = "mllama.text.attention.layer_norm_rms_epsilon"
TEXT_BLOCK_COUNT = "mllama.text.block_count"     # self + cross layers, as in the HF config
TEXT_VOCAB_SIZE = "mllama.text.vocab_size"
CROSS_ATTENTION_LAYERS = "mllama.text.cross_attention_layers"
IMAGE_TOKEN_ID = "mllama.image_token_id"

VISION_EMBEDDING_LENGTH = "mllama.vision.embedding_length"
VISION_FEED_FORWARD_LENGTH = "mllama.vision.feed_forward_length"
VISION_HEAD_COUNT = "mllama.vision.attention.head_count"
VISION_NORM_EPS = "mllama.vision.attention.layer_norm_epsilon"
VISION_BLOCK_COUNT = "mllama.vision.block_count"
VISION_GLOBAL_BLOCK_COUNT = "mllama.vision.global_block_count"
VISION_INTERMEDIATE_LAYERS = "mllama.vision.intermediate_layers_indices"
VISION_IMAGE_SIZE = "mllama.vision.image_size"   # tile side in pixels
VISION_PATCH_SIZE = "mllama.vision.patch_size"
VISION_NUM_CHANNELS = "mllama.vision.num_channels"
VISION_MAX_NUM_TILES = "mllama.vision.max_num_tiles"
VISION_OUTPUT_DIM = "mllama.vision.output_dim"
VISION_ASPECT_RATIOS = "mllama.vision.supported_aspect_ratios"  # flattened [h0, w0, h1, w1, ...]

PREPROCESS_IMAGE_MEAN = "mllama.preprocess.image_mean"
PREPROCESS_IMAGE_STD = "mllama.preprocess.image_std"
PREPROCESS_RESCALE_FACTOR = "mllama.preprocess.rescale_factor"
PREPROCESS_RESAMPLE = "mllama.preprocess.resample"              # PIL resample filter id
PREPROCESS_DO_CONVERT_RGB = "mllama.preprocess.do_convert_rgb"
PREPROCESS_DO_NORMALIZE = "mllama.preprocess.do_normalize"
PREPROCESS_DO_RESCALE = "mllama.preprocess.do_rescale"
PREPROCESS_DO_PAD = "mllama.preprocess.do_pad"

# Where an imported pair came from (`lva import` / `lva pull`); absent from converted pairs.
OLLAMA_MODEL = "mllama.ollama.model"             # host/namespace/model:tag@sha256:<model blob>
OLLAMA_CONVERTER = "mllama.ollama.converter"     # which of Ollama's converters wrote the blob, and how we know
CHAT_TEMPLATE_SOURCE = "mllama.chat_template_source"   # "ollama-gguf" or "llama-3.2-vision-instruct"
