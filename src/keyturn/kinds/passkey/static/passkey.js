// The passkey user pages' one script: it relays the server's WebAuthn options to
// navigator.credentials and the browser's answers back; the server decides every step.
"use strict";

(function () {
  const b64uDecode = (text) => {
    const pad = "=".repeat((4 - (text.length % 4)) % 4);
    const raw = atob((text + pad).replace(/-/g, "+").replace(/_/g, "/"));
    return Uint8Array.from(raw, (c) => c.charCodeAt(0));
  };
  const b64u = (buffer) => {
    if (!buffer) return null;
    const bytes = new Uint8Array(buffer);
    let raw = "";
    for (const b of bytes) raw += String.fromCharCode(b);
    return btoa(raw).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  };
  const byTestId = (id) => document.querySelector(`[data-testid="${id}"]`);
  const say = (text) => { const el = byTestId("status"); if (el) el.textContent = text || ""; };
  const fail = (text) => { const el = byTestId("error"); if (el) el.textContent = text || ""; };

  let csrf = (document.querySelector('meta[name="csrf-token"]') || {}).content || "";
  // where the pages are mounted on this origin ("" or e.g. "/passkey")
  const root = (document.querySelector('meta[name="root"]') || {}).content || "";

  async function api(path, body) {
    const response = await fetch(root + path, {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
      body: JSON.stringify(body || {}),
    });
    let data = {};
    try { data = await response.json(); } catch (e) { data = {}; }
    if (!response.ok) throw new Error(data.error || "Something went wrong; reload the page.");
    return data;
  }

  async function getAssertion(options) {
    const publicKey = Object.assign({}, options, {
      challenge: b64uDecode(options.challenge),
      allowCredentials: (options.allowCredentials || []).map(
        (c) => ({ type: c.type, id: b64uDecode(c.id) })),
    });
    const credential = await navigator.credentials.get({ publicKey });
    const r = credential.response;
    return {
      id: b64u(credential.rawId),
      type: credential.type,
      response: {
        clientDataJSON: b64u(r.clientDataJSON),
        authenticatorData: b64u(r.authenticatorData),
        signature: b64u(r.signature),
        userHandle: b64u(r.userHandle),
      },
    };
  }

  async function createCredential(options) {
    const publicKey = Object.assign({}, options, {
      challenge: b64uDecode(options.challenge),
      user: Object.assign({}, options.user, { id: b64uDecode(options.user.id) }),
      excludeCredentials: (options.excludeCredentials || []).map(
        (c) => ({ type: c.type, id: b64uDecode(c.id) })),
    });
    const credential = await navigator.credentials.create({ publicKey });
    return {
      id: b64u(credential.rawId),
      type: credential.type,
      response: {
        clientDataJSON: b64u(credential.response.clientDataJSON),
        attestationObject: b64u(credential.response.attestationObject),
      },
    };
  }

  // Answer the server until the step is done: each answer may bring the next prompt.
  async function carryOn(stage, reply) {
    let r = reply;
    for (;;) {
      if (r.get || r.create) {
        say(r.get ? "Confirm with your passkey in the browser's prompt." : "Create your new passkey in the browser's prompt.");
        let credential;
        try {
          credential = r.get ? await getAssertion(r.get) : await createCredential(r.create);
        } catch (e) {
          console.warn("passkey prompt failed:", e && e.name);
          throw new Error("The passkey prompt was closed or found no matching passkey. Nothing was changed; try again.");
        }
        say("Checking…");
        r = await api("/api/finish", { stage, credential });
      } else if (r.again) {
        r = await api("/api/begin", { stage });
      } else if (r.redirect) {
        say("Continuing on the new website…");
        window.location.assign(r.redirect);
        return;
      } else {
        window.location.replace(root + "/task");
        return;
      }
    }
  }

  function busy(button, on) {
    document.querySelectorAll("button").forEach((b) => { b.disabled = on; });
    if (button) button.setAttribute("aria-busy", on ? "true" : "false");
  }

  async function runStage(button) {
    const stage = button.dataset.stage;
    fail("");
    busy(button, true);
    try {
      await carryOn(stage, await api("/api/begin", { stage }));
    } catch (e) {
      say("");
      fail(e.message);
      busy(button, false);
    }
  }

  function taskPage() {
    const action = byTestId("action");
    if (action) {
      action.addEventListener("click", () => runStage(action));
      action.disabled = false;
    }
    const snooze = byTestId("snooze");
    if (snooze) {
      snooze.addEventListener("click", async () => {
        fail("");
        busy(snooze, true);
        try {
          await api("/api/snooze", {});
          window.location.replace(root + "/task");
        } catch (e) {
          fail(e.message);
          busy(snooze, false);
        }
      });
      snooze.disabled = false;
    }
  }

  async function movePage() {
    // the code and the hand-off token came in the fragment: read them, then drop them from
    // the address bar and the history before anything else
    const params = new URLSearchParams(window.location.hash.slice(1));
    history.replaceState(null, "", root + "/move");
    const action = byTestId("action");
    let reply;
    try {
      reply = await api("/api/handoff", { h: params.get("h") || "", c: params.get("c") || "" });
    } catch (e) {
      fail(e.message);
      return;
    }
    csrf = reply.csrf || "";
    if (!reply.create) {
      window.location.replace(root + "/task");
      return;
    }
    action.addEventListener("click", async () => {
      fail("");
      busy(action, true);
      try {
        await carryOn("register-code", { create: reply.create });
      } catch (e) {
        say("");
        fail(e.message);
        busy(action, false);
      }
    });
    action.disabled = false;
  }

  document.addEventListener("DOMContentLoaded", () => {
    const page = document.body.dataset.page;
    if (document.body.dataset.auto === "continue") {
      window.location.replace(root + "/task");
    } else if (page === "task") {
      taskPage();
    } else if (page === "move") {
      movePage();
    }
  });
})();
