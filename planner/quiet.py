"""Library chatter (progress bars, advisory warnings and log lines, hub retries) kept out of planner's own
output, each switched off at its source; `-v` leaves every library as it is."""
import logging
import os
import warnings

# Loggers of libraries that log per call (bitsandbytes: a "MatMul8bitLt: inputs will be cast" line per
# forward of every int8 layer, thousands per trial; its CPU kernel probe at import). Errors still show.
CHATTY_LOGGERS = ("bitsandbytes",)


def quiet_libraries(verbose: bool = False) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if verbose:
        return
    for category in (UserWarning, FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    import optuna
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    hub_logging.set_verbosity_error()  # the final failure still reaches the user as one line
    # planner prints its own line per trial, failures and their reasons included (no tracebacks)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    try:  # compressed-tensors logs through loguru
        from loguru import logger
    except ImportError:
        return
    logger.disable("compressed_tensors")
