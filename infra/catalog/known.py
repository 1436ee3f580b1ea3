"""Model tables, as data: the tiny built-in models the local default builds on first start, the
well-known models fetched into the store on first use, and the ids the docs give ControlNet 1.1."""

from __future__ import annotations

# the local default's models, built offline with random weights (`Runtime.ensure_builtin_models`)
BUILTIN_MODELS = {  # model id -> category
    "tiny-sd": "stable_diffusion",
    "tiny-sd-inpaint": "inpaint",  # the same architecture with a 9-channel inpainting UNet
    "tiny-motion-adapter": "motion_adapter",  # AnimateDiff motion modules for tiny-sd (text2video)
    "tiny-svd": "image_to_video",  # a Stable Video Diffusion pipeline (img2video)
}

# Well-known models fetched into the store on first use (setting `fetch_known_models`), through
# the same load path as load_model. id -> (source, category); `known_model_urls` overrides sources.
KNOWN_MODELS = {
    "RealESRGAN_x4plus": (
        "https://github.com/xinntao/Real-ESRGAN/releases/download/v0.1.0/RealESRGAN_x4plus.pth", "upscaler"),
    "RealESRNet_x4plus": (
        "https://github.com/xinntao/Real-ESRGAN/releases/download/v0.1.1/RealESRNet_x4plus.pth", "upscaler"),
    "RealESRGAN_x4plus_anime_6B": (
        "https://github.com/xinntao/Real-ESRGAN/releases/download/v0.2.2.4/RealESRGAN_x4plus_anime_6B.pth", "upscaler"),
    "RealESRGAN_x2plus": (
        "https://github.com/xinntao/Real-ESRGAN/releases/download/v0.2.1/RealESRGAN_x2plus.pth", "upscaler"),
    "realesr-general-x4v3": (
        "https://github.com/xinntao/Real-ESRGAN/releases/download/v0.2.5.0/realesr-general-x4v3.pth", "upscaler"),
    # "ultra_resolution" (4K+): the community 4x-UltraSharp ESRGAN
    "ultra_resolution": ("https://huggingface.co/Kim2091/UltraSharp/resolve/main/4x-UltraSharp.pth", "upscaler"),
    "GFPGANv1.4": ("https://github.com/TencentARC/GFPGAN/releases/download/v1.3.0/GFPGANv1.4.pth", "face_restorer"),
    "animatediff-motion-adapter-v1-5-2": ("guoyww/animatediff-motion-adapter-v1-5-2", "motion_adapter"),
    # multi_lingual's translator: Marian, from 100+ languages to English
    "opus-mt-mul-en": ("Helsinki-NLP/opus-mt-mul-en", "translator"),
    # mask_creator's segmenter: CLIPSeg (masks from words)
    "clipseg-rd64-refined": ("CIDAS/clipseg-rd64-refined", "segmenter"),
    # removebg_mask's background remover: U²-Net as rembg publishes it (one ONNX file, 176 MB)
    "u2net": ("https://github.com/danielgatis/rembg/releases/download/v0.0.0/u2net.onnx", "background_remover"),
    # img2video: Stable Video Diffusion XT (25 frames at 1024x576; a gated repo: the token in HF_TOKEN
    # must belong to an account that accepted its licence)
    "stable-video-diffusion-img2vid-xt": ("stabilityai/stable-video-diffusion-img2vid-xt", "image_to_video"),
}

# ModelsLab's IP-Adapter ids (ip_adapter_id) -> (source, the family of the models it fits):
# h94/IP-Adapter's weights file with the CLIP image encoder it was trained with, fetched as one folder
# (`owner/name:path,path`); the SDXL "vit-h" adapters use SD 1.5's ViT-H encoder, the others their own
IP_ADAPTERS = {
    "ip-adapter_sd15": ("h94/IP-Adapter:models/ip-adapter_sd15.safetensors,models/image_encoder", "sd"),
    "ip-adapter-plus-face_sd15": ("h94/IP-Adapter:models/ip-adapter-plus-face_sd15.safetensors,models/image_encoder", "sd"),
    "ip-adapter_sdxl": ("h94/IP-Adapter:sdxl_models/ip-adapter_sdxl.safetensors,sdxl_models/image_encoder", "sdxl"),
    "ip-adapter-plus_sdxl_vit-h": (
        "h94/IP-Adapter:sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors,models/image_encoder", "sdxl"),
    "ip-adapter-plus-face_sdxl_vit-h": (
        "h94/IP-Adapter:sdxl_models/ip-adapter-plus-face_sdxl_vit-h.safetensors,models/image_encoder", "sdxl"),
}
KNOWN_MODELS.update({model_id: (source, "ip_adapter") for model_id, (source, _) in IP_ADAPTERS.items()})

# ControlNet 1.1 repos and the ids the docs give them (used when load_model names no model_id)
CONTROLNET_11_IDS = {
    "lllyasviel/control_v11p_sd15_inpaint": "inpaint",
    "lllyasviel/control_v11e_sd15_ip2p": "ip2p",
    "lllyasviel/control_v11f1e_sd15_tile": "tile",
    "lllyasviel/control_v11e_sd15_shuffle": "shuffle",
    "lllyasviel/control_v11p_sd15_softedge": "softedge",
    "lllyasviel/control_v11p_sd15_scribble": "scribble",
    "lllyasviel/control_v11p_sd15_lineart": "lineart",
    "lllyasviel/control_v11p_sd15_normalbae": "normalbae",
    "lllyasviel/control_v11f1p_sd15_depth": "depth",
    "lllyasviel/control_v11p_sd15_mlsd": "mlsd",
    "lllyasviel/control_v11p_sd15_canny": "canny",
}
