"""The story the demo tells, step by step, through the public Python API only.

Ann is a CRM user of the sub-account ``demo-agency``; Carla is a contact out in
the world. Each method below is one step: it does what a person would do (the
CRM through :class:`threadsync.core.api.Threadsync`, Carla and Ann's mail program over
SMTP/IMAP), runs one daemon pass where mail has to be picked up, and records
what it expected and what it observed.
"""

from __future__ import annotations

import imaplib
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import aiosmtplib

from threadsync.core.api import Threadsync
from threadsync.core.errors import LabsDisabled
from threadsync.core.mime import AttachmentIn
from threadsync.core.outbox.compose import Draft
from threadsync.plugins.localmail.demo.people import Contact, MailClient, Server
from threadsync.plugins.localmail.demo.transcript import Step
from threadsync.plugins.localmail.system import MailSystemThread

SUB = "demo-agency"
USER = "ann"
ANN = "ann@example.test"
ANN_NEW = "ann.new@example.test"
CARLA = "carla@customer.example"
CRM_FROM = "crm@threadsync.local"
PASSWORD_ENV = {ANN: "DEMO_ANN_PASSWORD", ANN_NEW: "DEMO_ANN_NEW_PASSWORD"}
FOUR_MB = 4 * 1024 * 1024
#: What Carla's and Ann's mail programs may raise when the mail system misbehaves.
PEOPLE_ERRORS: tuple[type[Exception], ...] = (aiosmtplib.SMTPException, imaplib.IMAP4.error)


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


class Story:
    """The steps, in order, sharing what earlier steps made (thread, Message-IDs)."""

    def __init__(self, ts: Threadsync, mail: MailSystemThread, passwords: dict[str, str]) -> None:
        self.ts = ts
        self.mail = mail
        info = mail.info()
        self.server = Server(info["host"], info["smtp_port"], info["imap_port"], info["ca_file"])
        self.carla = Contact(CARLA, self.server)
        self.client = MailClient(ANN, passwords[ANN], self.server)
        self.thread_id = ""
        self.chain: list[str] = []

    def steps(self) -> list[tuple[str, str, Callable[[Step], Awaitable[None]]]]:
        return [
            ("mail_system", "A local mail system is running", self.mail_system),
            ("labs_gate", "Two-way sync is a Labs feature", self.labs_gate),
            ("connect", "Ann connects her mailbox", self.connect),
            ("crm_send", "Ann emails Carla from the CRM", self.crm_send),
            ("contact_reply", "Carla replies", self.contact_reply),
            ("client_reply", "Ann answers from her own mail program", self.client_reply),
            ("crm_reply", "Ann replies from the CRM", self.crm_reply),
            ("synced_thread", "The synced thread, as the CRM shows it", self.synced_thread),
            ("personal_thread", "A personal thread stays personal", self.personal_thread),
            ("large_attachment", "A 4 MB attachment does not sync", self.large_attachment),
            ("update_email", "Ann's address changes", self.update_email),
            ("disconnect", "Ann disconnects her mailbox", self.disconnect),
        ]

    # ---- helpers ----------------------------------------------------------------------

    def options(self, email: str) -> dict[str, Any]:
        """Connect options: STARTTLS, verified against the local mail system's CA."""
        return {
            "imap_host": self.server.host,
            "imap_port": self.server.imap_port,
            "smtp_host": self.server.host,
            "smtp_port": self.server.smtp_port,
            "security": "starttls",
            "ca_file": self.server.ca_file,
            "password_env": PASSWORD_ENV[email],
        }

    def received_by_carla(self, message_id: str) -> list[Any]:
        return [m for m in self.mail.outside_messages() if m.message_id == message_id]

    def sender_seen_by_carla(self, message_id: str) -> str | None:
        got = self.received_by_carla(message_id)
        return got[0].envelope_from if got else None

    async def daemon_pass(self, step: Step) -> dict[str, int]:
        report = await self.ts.run_once()
        for error in report.errors:
            step.changes.append(f"daemon pass error: {error}")
        return {"stored": report.stored, "skipped": report.skipped, "errors": len(report.errors)}

    def messages(self) -> list[dict[str, Any]]:
        return list(self.ts.thread(self.thread_id)["messages"])

    # ---- the steps --------------------------------------------------------------------

    async def mail_system(self, step: Step) -> None:
        step.explanation = (
            "threadsync needs a mailbox to sync with. The demo started a real one in this "
            "process: SMTP (aiosmtpd) and IMAP (pymap) over Maildirs, with STARTTLS. Mail to "
            "anyone who is not a local user stays in the 'outside world' mailbox."
        )
        info = self.mail.info()
        step.expected = {"smtp": True, "imap": True, "users": sorted([ANN, ANN_NEW])}
        step.observed = {
            "smtp": port_open(info["host"], info["smtp_port"]),
            "imap": port_open(info["host"], info["imap_port"]),
            "users": info["users"],
        }
        step.details = {k: info[k] for k in ("host", "smtp_port", "imap_port", "ca_file")}
        step.changes = [
            f"SMTP on {info['host']}:{info['smtp_port']}, IMAP on {info['host']}:"
            f"{info['imap_port']}; mailboxes {ANN} and {ANN_NEW}, each with INBOX and Sent",
            f"the same SMTP server is the CRM's own relay for {CRM_FROM}",
        ]

    async def labs_gate(self, step: Step) -> None:
        step.explanation = (
            f"The sub-account {SUB!r} must switch on the Labs flag two_way_email_sync before "
            "anyone can connect a mailbox."
        )
        refused = None
        try:
            await self.ts.connect(SUB, USER, "imap_smtp", email=ANN, options=self.options(ANN))
        except LabsDisabled as exc:
            refused = exc.code
        flag = self.ts.labs(SUB, enabled=True)
        step.expected = {"connect_while_off": "labs_disabled", "two_way_email_sync": True}
        step.observed = {
            "connect_while_off": refused,
            "two_way_email_sync": flag["two_way_email_sync"],
        }
        step.changes = [
            "connecting while the flag was off was refused (labs_disabled)",
            f"the flag is now on for {SUB}",
        ]

    async def connect(self, step: Step) -> None:
        step.explanation = (
            f"Ann connects {ANN} with the built-in imap_smtp provider, over STARTTLS. "
            "threadsync logs in to IMAP and SMTP, stores the password encrypted and starts "
            "reading only from now on: older mail is never looked at."
        )
        conn = await self.ts.connect(SUB, USER, "imap_smtp", email=ANN, options=self.options(ANN))
        step.expected = {"state": "connected", "email": ANN, "provider": "imap_smtp"}
        step.observed = {k: conn[k] for k in ("state", "email", "provider")}
        step.details = {"connection_id": conn["id"]}
        step.changes = [f"connection {conn['id']}: {ANN} via imap_smtp is {conn['state']}"]

    async def crm_send(self, step: Step) -> None:
        step.explanation = (
            "A message sent from the CRM while the mailbox is connected goes out through "
            "Ann's own mailbox, lands in her Sent folder, and starts a synced thread."
        )
        sent = await self.ts.send(
            SUB,
            USER,
            Draft(
                to=[CARLA], subject="Our offer", text="Hello Carla,\n\nhere is our offer.\n\nAnn"
            ),
        )
        self.thread_id = sent["thread_id"]
        self.chain = [sent["message_id"]]
        in_sent = sent["message_id"] in await self.client.message_ids("Sent")
        step.expected = {
            "channel": "mailbox",
            "synced": True,
            "status": "sent",
            "carla_got_it_from": ANN,
            "in_ann_sent_folder": True,
        }
        step.observed = {
            **{k: sent[k] for k in ("channel", "synced", "status")},
            "carla_got_it_from": self.sender_seen_by_carla(sent["message_id"]),
            "in_ann_sent_folder": in_sent,
        }
        step.details = {"thread_id": self.thread_id, "message_id": sent["message_id"]}
        step.changes = [
            f"thread {self.thread_id} is synced",
            f"Carla received it from {ANN}",
            "a copy is in Ann's Sent folder",
        ]

    async def contact_reply(self, step: Step) -> None:
        step.explanation = (
            "Carla answers from her own mail program. Her reply reaches Ann's INBOX; the next "
            "daemon pass reads the headers of new mail, sees the reply belongs to the synced "
            "thread, and only then downloads it."
        )
        mid = await self.carla.write(
            ANN,
            "Re: Our offer",
            "Thanks Ann, looks good. Carla",
            in_reply_to=self.chain[-1],
            references=self.chain,
        )
        self.chain.append(mid)
        passed = await self.daemon_pass(step)
        last = self.messages()[-1]
        step.expected = {
            "stored": 1,
            "errors": 0,
            "message_id": mid,
            "direction": "inbound",
            "origin": "mailbox",
            "from": CARLA,
        }
        step.observed = {
            **passed,
            **{k: last[k] for k in ("message_id", "direction", "origin", "from")},
        }
        step.details = {"message_id": mid}
        step.changes = [f"inbound message from {CARLA} is now in thread {self.thread_id}"]

    async def client_reply(self, step: Step) -> None:
        step.explanation = (
            "Ann replies from her mail program, not from the CRM: it sends over SMTP and "
            "files a copy in Sent. threadsync finds it there and adds it to the thread."
        )
        mid = await self.client.send(
            CARLA,
            "Re: Our offer",
            "Great, I'll send the contract.",
            in_reply_to=self.chain[-1],
            references=self.chain,
        )
        self.chain.append(mid)
        passed = await self.daemon_pass(step)
        last = self.messages()[-1]
        step.expected = {
            "stored": 1,
            "errors": 0,
            "message_id": mid,
            "direction": "outbound",
            "origin": "mailbox",
            "carla_got_it_from": ANN,
        }
        step.observed = {
            **passed,
            **{k: last[k] for k in ("message_id", "direction", "origin")},
            "carla_got_it_from": self.sender_seen_by_carla(mid),
        }
        step.details = {"message_id": mid}
        step.changes = ["Ann's own reply (origin mailbox) is now in the thread"]

    async def crm_reply(self, step: Step) -> None:
        step.explanation = (
            "A reply written in the CRM goes through Ann's mailbox again, with In-Reply-To "
            "and References set, so every mail program shows one conversation."
        )
        sent = await self.ts.reply(self.thread_id, Draft(text="Contract attached soon. Ann"))
        self.chain.append(sent["message_id"])
        got = self.received_by_carla(sent["message_id"])
        step.expected = {
            "channel": "mailbox",
            "synced": True,
            "status": "sent",
            "in_reply_to": self.chain[-2],
        }
        step.observed = {
            **{k: sent[k] for k in ("channel", "synced", "status")},
            "in_reply_to": got[0].in_reply_to if got else None,
        }
        step.details = {"message_id": sent["message_id"]}
        step.changes = [
            "Carla received it threaded under Ann's reply from her mail program (In-Reply-To)"
        ]

    async def synced_thread(self, step: Step) -> None:
        step.explanation = (
            "Every message of the conversation is in the CRM once, whichever side wrote it. "
            "More daemon passes change nothing: the CRM's own copies in Sent are recognised."
        )
        again = [await self.daemon_pass(step) for _ in range(2)]
        thread = self.ts.thread(self.thread_id)
        shape = [[m["direction"], m["origin"]] for m in thread["messages"]]
        step.expected = {
            "state": "active",
            "message_ids": self.chain,
            "stored_later": 0,
            "shape": [
                ["outbound", "crm"],
                ["inbound", "mailbox"],
                ["outbound", "mailbox"],
                ["outbound", "crm"],
            ],
        }
        step.observed = {
            "state": thread["state"],
            "message_ids": [m["message_id"] for m in thread["messages"]],
            "stored_later": sum(p["stored"] for p in again),
            "shape": shape,
        }
        step.details = {"thread_id": self.thread_id}
        origins = {"crm": "written in the CRM", "mailbox": "found in the mailbox"}
        step.changes = [
            f"{'in ' if m['direction'] == 'inbound' else 'out'}  {m['from']}, "
            f"{origins[m['origin']]}: {m['subject']}"
            for m in thread["messages"]
        ]

    async def personal_thread(self, step: Step) -> None:
        step.explanation = (
            "Carla also writes to Ann about something else, and Ann answers from her mail "
            "program. That thread did not start in the CRM, so it never syncs: only its "
            "headers were read, to see that it does not belong to a synced thread."
        )
        lunch = await self.carla.write(ANN, "Lunch on Friday?", "Shall we? Carla")
        answer = await self.client.send(
            CARLA, "Re: Lunch on Friday?", "Yes!", in_reply_to=lunch, references=[lunch]
        )
        passed = await self.daemon_pass(step)
        threads = self.ts.threads(SUB)["threads"]
        stored = {
            m["message_id"] for t in threads for m in self.ts.thread(t["thread_id"])["messages"]
        }
        step.expected = {"stored": 0, "errors": 0, "threads": 1, "personal_messages_stored": 0}
        step.observed = {
            **passed,
            "threads": len(threads),
            "personal_messages_stored": len({lunch, answer} & stored),
        }
        step.details = {"personal_message_ids": [lunch, answer]}
        step.changes = ["2 personal messages in Ann's mailbox; nothing about them was stored"]

    async def large_attachment(self, step: Step) -> None:
        step.explanation = (
            "Attachments over 3 MB do not sync, in either direction. Carla's reply with a "
            "4 MB file is recorded as skipped: its headers and the file's name and size, but "
            "no body and no file content. A CRM reply with a 4 MB file is still delivered, "
            "through the CRM's own relay, and is not synced. The thread stays synced for "
            "later messages."
        )
        data = os.urandom(FOUR_MB)
        mid = await self.carla.write(
            ANN,
            "Re: Our offer",
            "The signed contract.",
            in_reply_to=self.chain[-1],
            references=self.chain,
            attachment=("contract.pdf", data),
        )
        passed = await self.daemon_pass(step)
        last = self.messages()[-1]
        crm = await self.ts.reply(
            self.thread_id,
            Draft(
                text="Our brochure.",
                attachments=[AttachmentIn("brochure.pdf", "application/pdf", data)],
            ),
        )
        step.expected = {
            "skipped": 1,
            "errors": 0,
            "state": "skipped",
            "reason": "attachment_too_large",
            "text": None,
            "attachments": [["contract.pdf", FOUR_MB]],
            "crm_channel": "default",
            "crm_synced": False,
            "crm_reason": "attachment_too_large",
            "carla_got_it_from": CRM_FROM,
            "thread_state": "active",
        }
        step.observed = {
            "skipped": passed["skipped"],
            "errors": passed["errors"],
            "state": last["state"],
            "reason": last["reason"],
            "text": last["text"],
            "attachments": [[a["filename"], a["size"]] for a in last["attachments"]],
            "crm_channel": crm["channel"],
            "crm_synced": crm["synced"],
            "crm_reason": crm["reason"],
            "carla_got_it_from": self.sender_seen_by_carla(crm["message_id"]),
            "thread_state": self.ts.thread(self.thread_id)["state"],
        }
        step.details = {"message_id": mid, "crm_message_id": crm["message_id"]}
        step.changes = [
            f"Carla's message is in the thread as skipped (attachment_too_large); the "
            f"{FOUR_MB:,} bytes of contract.pdf were not stored",
            f"the CRM reply went through the default channel ({CRM_FROM}), not synced",
        ]

    async def update_email(self, step: Step) -> None:
        step.explanation = (
            f"Ann now uses {ANN_NEW}. Updating the address replaces the connection without a "
            "gap: new CRM mail goes through the new address at once, and threads of the old "
            "address stop syncing (reason replaced)."
        )
        old = self.ts.status(SUB, USER)["connections"][-1]
        new = await self.ts.update_email(
            SUB, USER, "imap_smtp", email=ANN_NEW, options=self.options(ANN_NEW)
        )
        old_now = next(c for c in self.ts.status(SUB, USER)["connections"] if c["id"] == old["id"])
        thread = self.ts.thread(self.thread_id)
        sent = await self.ts.send(
            SUB,
            USER,
            Draft(to=[CARLA], subject="New address", text="Please write to my new address. Ann"),
        )
        self.thread_id, self.chain = sent["thread_id"], [sent["message_id"]]
        step.expected = {
            "new_state": "connected",
            "old_state": "replaced",
            "old_thread": ["stopped", "replaced"],
            "send_channel": "mailbox",
            "send_synced": True,
            "carla_got_it_from": ANN_NEW,
        }
        step.observed = {
            "new_state": new["state"],
            "old_state": old_now["state"],
            "old_thread": [thread["state"], thread["stop_reason"]],
            "send_channel": sent["channel"],
            "send_synced": sent["synced"],
            "carla_got_it_from": self.sender_seen_by_carla(sent["message_id"]),
        }
        step.details = {
            "old_connection_id": old["id"],
            "new_connection_id": new["id"],
            "old_thread_id": thread["thread_id"],
            "thread_id": self.thread_id,
        }
        step.changes = [
            f"connection {old['id']} ({ANN}) is replaced; connection {new['id']} "
            f"({ANN_NEW}) is connected",
            f"thread {thread['thread_id']} stopped (replaced)",
            f"a new CRM message went out from {ANN_NEW}: thread {self.thread_id}",
        ]

    async def disconnect(self, step: Step) -> None:
        step.explanation = (
            "Disconnecting deletes the stored password and stops every thread of the "
            "connection for good. CRM mail goes through the CRM's own relay again."
        )
        conn = await self.ts.disconnect(SUB, USER)
        thread = self.ts.thread(self.thread_id)
        reply = await self.ts.reply(self.thread_id, Draft(text="Still there?"))
        sent = await self.ts.send(
            SUB, USER, Draft(to=[CARLA], subject="Hello again", text="Hello from the CRM.")
        )
        step.expected = {
            "state": "disconnected",
            "thread": ["stopped", "disconnected"],
            "reply_channel": "default",
            "reply_reason": "thread_stopped",
            "send_channel": "default",
            "send_synced": False,
            "send_reason": "no_connection",
            "carla_got_it_from": CRM_FROM,
        }
        step.observed = {
            "state": conn["state"],
            "thread": [thread["state"], thread["stop_reason"]],
            "reply_channel": reply["channel"],
            "reply_reason": reply["reason"],
            "send_channel": sent["channel"],
            "send_synced": sent["synced"],
            "send_reason": sent["reason"],
            "carla_got_it_from": self.sender_seen_by_carla(sent["message_id"]),
        }
        step.details = {
            "connection_id": conn["id"],
            "thread_id": self.thread_id,
            "unsynced_thread_id": sent["thread_id"],
        }
        step.changes = [
            f"connection {conn['id']} is disconnected",
            f"thread {self.thread_id} stopped (disconnected)",
            f"CRM mail now goes out from {CRM_FROM}, not synced",
        ]
