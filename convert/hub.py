"""Fetch a checkpoint from the Hugging Face Hub when the converter is given a repo id instead of a directory.

Downloads go through `huggingface_hub.snapshot_download`, so they land in the normal HF cache (HF_HOME /
HF_HUB_CACHE), are shared with other tools, show huggingface_hub's progress bars, skip files already cached,
and use the token from `hf auth login` or HF_TOKEN. Failures a user can fix become one-line `ConvertError`s.
"""

from pathlib import Path

import httpx2
from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

from convert.errors import ConvertError

# What a conversion reads: weights, configs, tokenizer, and the license texts / model card that carry the license.
CHECKPOINT_FILES = [
    "config.json",
    "generation_config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",  # newer checkpoints keep the chat template out of tokenizer_config.json
    "chat_template.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "LICENSE*",
    "USE_POLICY.md",
    "README.md",
]
# Only top-level files: this keeps out Meta's `original/` folder (tens of GB of consolidated .pth) and any
# other sub-folder, which the patterns above would otherwise match since fnmatch's `*` crosses `/`.
SKIPPED_FILES = ["*/*"]


def looks_like_repo_id(source: str) -> bool:
    """Whether `source` names a Hub repo (`owner/name`) rather than a local path; an existing path always wins,
    so a local directory that happens to be called `owner/name` is still converted from disk."""
    if source.count("/") != 1 or Path(source).exists():
        return False
    try:
        validate_repo_id(source)  # the Hub's own naming rules, so `./x` and `../x` are rejected
    except HFValidationError:
        return False
    return True


def download_checkpoint(repo_id: str, revision: str | None = None) -> Path:
    """Download the files a conversion needs from `repo_id` and return the local snapshot directory.

    Complete files already in the cache are not fetched again, so re-running after an interruption only
    downloads what is missing. If the Hub cannot be reached but a complete copy is cached, that copy is used.
    """
    try:
        snapshot = snapshot_download(
            repo_id, revision=revision, allow_patterns=CHECKPOINT_FILES, ignore_patterns=SKIPPED_FILES
        )
    # huggingface_hub's HTTP and cache errors are OSErrors; network failures mid-transfer come straight from httpx2.
    except (OSError, HFValidationError, httpx2.TransportError) as error:
        raise ConvertError(_explain(error, repo_id, revision)) from error
    return Path(snapshot)


def _explain(error: Exception, repo_id: str, revision: str | None) -> str:
    """A one-line, actionable message for a failed download."""
    # snapshot_download wraps most HTTP errors (a 500, say) in LocalEntryNotFoundError: look for the cause.
    http_error = _http_error_in(error)
    if isinstance(http_error, GatedRepoError):
        return (
            f"{repo_id} is a gated model: accept its license on https://huggingface.co/{repo_id}, "
            "then log in with `hf auth login` (or set HF_TOKEN) and retry"
        )
    if isinstance(http_error, RepositoryNotFoundError):
        return (
            f"repository {repo_id} was not found on the Hugging Face Hub: check the id, "
            "or log in with `hf auth login` (or set HF_TOKEN) if it is private"
        )
    if isinstance(http_error, RevisionNotFoundError):
        return f"revision {revision!r} was not found in {repo_id}: check the branch, tag or commit"
    if http_error is not None:
        reason = http_error.server_message or http_error.response.reason_phrase
        status = http_error.response.status_code
        return f"the Hugging Face Hub answered HTTP {status} for {repo_id}: {_first_line(reason)}"
    if isinstance(error, HFValidationError):
        return f"{repo_id!r} is not a valid Hugging Face repo id ({_first_line(str(error))})"
    if constants.is_offline_mode():
        return f"HF_HUB_OFFLINE is set and {repo_id} is not fully cached: unset it or convert a local directory instead"
    if isinstance(error, (LocalEntryNotFoundError, httpx2.TransportError)):
        return (
            f"could not reach the Hugging Face Hub at {constants.ENDPOINT} to download {repo_id} "
            "(check the network, proxy or HF_ENDPOINT), or convert a local directory instead"
        )
    return f"could not download {repo_id}: {_first_line(str(error))}"  # e.g. disk full, or a truncated file


def _http_error_in(error: BaseException | None) -> HfHubHTTPError | None:
    """The Hub's HTTP error among `error` and its causes, if any."""
    while error is not None and not isinstance(error, HfHubHTTPError):
        error = error.__cause__
    return error


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), text)
