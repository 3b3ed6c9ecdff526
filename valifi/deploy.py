"""`valifi deploy` and `valifi worker`: the `train/nightly` deployment on a process pool.

`prefect.yaml` at the repository root is the deployment's definition; this module
creates the work pool, applies the file with Prefect's own `prefect deploy`, and,
when a webhook is configured, an automation that notifies on failed, rejected,
crashed and rolled-back runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from core.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
POOL = "valifi-process"
DEPLOYMENT = "train/nightly"
NOTIFY_BLOCK = "valifi-notify"
AUTOMATION = "valifi-train-notifications"
# Flow-run events of the states worth a message (custom state names included).
NOTIFY_EVENTS = [
    "prefect.flow-run.Failed",
    "prefect.flow-run.Crashed",
    "prefect.flow-run.Rejected",
    "prefect.flow-run.RolledBack",
]


class DeployError(RuntimeError):
    pass


def _prefect() -> str:
    candidate = Path(sys.executable).parent / "prefect"
    return str(candidate) if candidate.exists() else "prefect"


def prefect_env(settings: Settings) -> dict[str, str]:
    return {
        **os.environ,
        "PREFECT_API_URL": settings.prefect_api_url,
        "VALIFI_PROJECT_DIR": str(ROOT),
        "VALIFI_SCHEDULE_TIMEZONE": settings.schedule_timezone,
        "PREFECT_CLI_PROMPT": "false",
    }


def _run(args: list[str], settings: Settings) -> str:
    r = subprocess.run(
        [_prefect(), *args],
        cwd=ROOT,
        env=prefect_env(settings),
        capture_output=True,
        text=True,
        timeout=300,
    )
    if r.returncode != 0:
        tail = "\n".join((r.stderr or r.stdout).strip().splitlines()[-8:])
        raise DeployError(f"prefect {' '.join(args)} failed:\n{tail}")
    return r.stdout


def deploy(settings: Settings) -> list[str]:
    """Create or update the work pool, the deployment and the notifications."""
    done = []
    _run(["work-pool", "create", POOL, "--type", "process", "--overwrite"], settings)
    done.append(f"work pool {POOL} (process)")
    _run(["--no-prompt", "deploy", "--all", "--prefect-file", str(ROOT / "prefect.yaml")], settings)
    done.append(
        f"deployment {DEPLOYMENT}: cron 0 2 * * * ({settings.schedule_timezone}), one run at a time"
    )
    if settings.notify_webhook_url:
        notifications(settings)
        done.append(f"automation {AUTOMATION} -> {settings.notify_webhook_url}")
    return done


def notifications(settings: Settings) -> None:
    """A webhook block and an automation that posts to it on bad outcomes of the deployment."""
    import asyncio

    os.environ["PREFECT_API_URL"] = settings.prefect_api_url
    from prefect.automations import Automation
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.client.orchestration import get_client
    from prefect.events.actions import SendNotification
    from prefect.events.schemas.automations import EventTrigger, Posture

    block = CustomWebhookNotificationBlock(
        name="valifi",
        url=settings.notify_webhook_url,
        method="POST",
        json_data={"text": "{{subject}}\n{{body}}", "subject": "{{subject}}", "body": "{{body}}"},
    )
    block_id = block.save(NOTIFY_BLOCK, overwrite=True)

    async def deployment_id() -> str:
        async with get_client() as client:
            return str((await client.read_deployment_by_name(DEPLOYMENT)).id)

    dep = asyncio.run(deployment_id())
    _delete_automations(AUTOMATION)
    Automation(
        name=AUTOMATION,
        description="Notify on failed, crashed, rejected and rolled-back train runs",
        trigger=EventTrigger(
            expect=set(NOTIFY_EVENTS),
            match_related={"prefect.resource.id": f"prefect.deployment.{dep}"},
            posture=Posture.Reactive,
            threshold=1,
        ),
        actions=[
            SendNotification(
                block_document_id=block_id,
                subject="valifi train run {{ flow_run.name }}: {{ flow_run.state.name }}",
                body="{{ flow_run.state.message }}\n{{ flow_run|ui_url }}",
            )
        ],
    ).create()


def _delete_automations(name: str) -> None:
    """Remove earlier automations of this name, so a new deploy replaces them."""
    from prefect.automations import Automation

    for _ in range(20):  # each read returns one; a name is not unique in Prefect
        try:
            Automation.read(name=name).delete()
        except ValueError:  # none left
            return


def worker_command(settings: Settings) -> tuple[list[str], dict[str, str]]:
    env = prefect_env(settings)
    env.setdefault("PREFECT_WORKER_QUERY_SECONDS", str(int(settings.worker_poll_s)))
    return [_prefect(), "worker", "start", "--pool", POOL, "--type", "process"], env
