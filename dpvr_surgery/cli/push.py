"""`dpvr-surgery push`: check a converted folder and upload it to the Hugging Face Hub."""

from pathlib import Path

import click

from .options import GroupedCommand, misc_options, option


@click.command(cls=GroupedCommand)
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@option("--repo-id", group="Output", required=True, help="Hub repository to create or update, as owner/name.")
@option(
    "--private",
    group="Output",
    is_flag=True,
    help="Create the repository as private (an existing repository keeps its visibility).",
)
@option(
    "--revision", group="Output", help="Branch to upload to, created from the default branch if it does not exist."
)
@option(
    "--create-pr",
    group="Output",
    is_flag=True,
    help="Open a pull request with the upload instead of committing directly.",
)
@option("--commit-message", group="Output", help="Commit message (default: a message naming dpvr-surgery).")
@option(
    "--dry-run",
    group="Output",
    is_flag=True,
    help="Check the folder and list the files and sizes, with no network calls.",
)
@misc_options
def push(folder, repo_id, private, revision, create_pr, commit_message, dry_run, misc):
    """Upload the converted model FOLDER to the Hub repository --repo-id, after checking weights, code and card.

    The token comes from HF_TOKEN or `hf auth login` and is never printed.
    """
    from ..export.hub import PushRequest, push_folder

    request = PushRequest(
        folder=folder,
        repo_id=repo_id,
        private=private,
        revision=revision,
        create_pr=create_pr,
        commit_message=commit_message,
        dry_run=dry_run,
    )
    result = push_folder(request)
    if dry_run:
        click.echo(f"Dry run: {folder} is ready to push to {repo_id}. Files that would be uploaded:")
        for path, size in result.files:
            click.echo(f"  {size:>14,d}  {path}")
        click.echo(f"  {result.total_bytes:>14,d}  bytes in {len(result.files)} files")
        return
    click.echo(f"Uploaded {len(result.files)} files ({result.total_bytes / 1e9:.2f} GB) to {result.repo_url}")
    click.echo(f"Commit: {result.commit_url}")
    if result.pull_request_url:
        click.echo(f"Pull request: {result.pull_request_url}")
