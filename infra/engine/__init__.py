"""The only package that imports torch and diffusers. Import its modules lazily from the rest."""


def quiet_libraries() -> None:
    """Errors only from diffusers / transformers, and no progress bars in the server log."""
    import diffusers
    import transformers

    diffusers.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
