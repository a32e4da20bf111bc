// Textual Inversion tab: clicking an embedding card adds its token to the prompt the user works in, and a
// second click removes it, as the web UIs' own extra-network cards do; when the tab has written an
// embedding file, the web UI's own Textual Inversion card lists are refreshed, so the new one shows there;
// the Train tab's progress is fetched about once a second by clicking its hidden update button; a typed
// number of vectors out of range is refused in the CLI's words; and where
// the web UI derives the tab's label from its id (SD.Next's Modern UI), the label is put right.
//
// The web UIs inject this file into every page, so it must never disturb them: one IIFE, no globals but a
// load guard, and listeners on the document (delegation), so cards re-rendered by a Refresh keep working
// without re-binding. The standalone app runs the same file as a page-load function.
(function () {
    "use strict";
    if (window.__tiTextualInversionLoaded) {
        return;
    }
    window.__tiTextualInversionLoaded = true;

    // Prompt boxes a card may write into: ours (standalone) first, then the web UIs' generate views:
    // txt2img, img2img, and SD.Next's control view (its Modern UI's "Generate" view, where the classic
    // txt2img/img2img boxes stay in the page but hidden).
    var PROMPT_IDS = [
        "ti_try_prompt", "ti_try_negative",
        "txt2img_prompt", "txt2img_neg_prompt", "img2img_prompt", "img2img_neg_prompt",
        "control_prompt", "control_neg_prompt"
    ];
    var PROMPT_NAMES = {
        ti_try_prompt: "Try-it prompt", ti_try_negative: "Try-it negative prompt",
        txt2img_prompt: "txt2img prompt", txt2img_neg_prompt: "txt2img negative prompt",
        img2img_prompt: "img2img prompt", img2img_neg_prompt: "img2img negative prompt",
        control_prompt: "control prompt", control_neg_prompt: "control negative prompt"
    };
    // Each view's negative prompt: a negative embedding's card writes there.
    var NEGATIVE_OF = {
        ti_try_prompt: "ti_try_negative", txt2img_prompt: "txt2img_neg_prompt",
        img2img_prompt: "img2img_neg_prompt", control_prompt: "control_neg_prompt"
    };
    // The box the user works in: the one last focused, or else the main prompt of the generate view last
    // seen on screen (the user clicks a card on our tab, where every generate view is hidden).
    var lastPromptId = null;

    function appRoot() {
        return typeof gradioApp === "function" ? gradioApp() : document;
    }

    function isModernUi() {
        return !!document.querySelector("#split-app") || !!appRoot().querySelector("#split-app");
    }

    function promptName(id) {
        if (isModernUi() && id.indexOf("control_") === 0) {
            return id === "control_prompt" ? "Generate prompt" : "Generate negative prompt";
        }
        return PROMPT_NAMES[id];
    }

    // By id first, then inside: a web UI's page has tens of thousands of elements, and this runs often.
    function byId(id) {
        var root = appRoot();
        return root.getElementById ? root.getElementById(id) : root.querySelector("#" + id);
    }

    function promptTextarea(id) {
        var element = byId(id);
        return element && element.querySelector("textarea");
    }

    function shown(element) {
        return !!element && element.getClientRects().length > 0;
    }

    function promptIdOf(element) {
        for (var i = 0; i < PROMPT_IDS.length; i++) {
            if (element.closest && element.closest("#" + PROMPT_IDS[i])) {
                return PROMPT_IDS[i];
            }
        }
        return null;
    }

    // Called often (see tick): when the remembered box is off screen and a generate view is on screen,
    // that view's main prompt becomes the target; a focused box of the same view stays the target.
    function noteShownPrompt() {
        if (lastPromptId && shown(promptTextarea(lastPromptId))) {
            return;
        }
        for (var i = 0; i < PROMPT_IDS.length; i++) {
            if (PROMPT_IDS[i].indexOf("neg") < 0 && shown(promptTextarea(PROMPT_IDS[i]))) {
                lastPromptId = PROMPT_IDS[i];
                return;
            }
        }
    }

    function targetPromptId() {
        noteShownPrompt();
        if (lastPromptId && promptTextarea(lastPromptId)) {
            return lastPromptId;
        }
        // Nothing seen yet: the view a user starts in. SD.Next's Modern UI starts in its control view and
        // hides the classic boxes; elsewhere txt2img comes first.
        var order = isModernUi() ? ["control_prompt"].concat(PROMPT_IDS) : PROMPT_IDS;
        for (var i = 0; i < order.length; i++) {
            if (order[i].indexOf("neg") < 0 && promptTextarea(order[i])) {
                return order[i];
            }
        }
        return null;
    }

    function escapeRegExp(text) {
        return text.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
    }

    // The prompt without `token` where it stands as a whole word (not inside "my-token-2"), or wrapped in
    // the web UIs' attention syntax on its own: "(token:1.2)", "((token))", "[token]". The separator before
    // it goes too. null when the token is not there.
    function withoutToken(value, token) {
        var word = escapeRegExp(token);
        var weighted = "\\(+\\s*" + word + "\\s*(?::\\s*-?[\\d.]+\\s*)?\\)+|\\[+\\s*" + word + "\\s*\\]+";
        var pattern = new RegExp("(^|\\s*,\\s*|\\s+)(?:" + weighted + "|" + word + "(?![\\w-]))", "g");
        var atStart = false;
        var result = value.replace(pattern, function (match, separator, offset) {
            if (offset === 0 && separator === "") {
                atStart = true;
            }
            return "";
        });
        if (result === value) {
            return null;
        }
        return atStart ? result.replace(/^\s*,?\s*/, "") : result;
    }

    function withToken(value, token) {
        var trimmed = value.replace(/\s+$/, "");
        return trimmed === "" ? token : trimmed + " " + token;
    }

    function tellGradio(textarea) {
        if (typeof updateInput === "function") {
            updateInput(textarea); // the host's helper: also what its own cards use
        } else {
            textarea.dispatchEvent(new Event("input", {bubbles: true}));
        }
    }

    function announce(text) {
        var status = appRoot().querySelector("#ti_embeddings_insert_status");
        if (status) {
            status.textContent = text;
        }
    }

    // negative: the card of a negative embedding, which goes into the negative prompt of the same view.
    function toggleToken(token, negative) {
        var id = targetPromptId();
        if (negative && id && NEGATIVE_OF[id] && promptTextarea(NEGATIVE_OF[id])) {
            id = NEGATIVE_OF[id];
        }
        var textarea = id && promptTextarea(id);
        if (!textarea) {
            announce("No prompt box found to add " + token + " to.");
            return;
        }
        var removed = withoutToken(textarea.value, token);
        textarea.value = removed === null ? withToken(textarea.value, token) : removed;
        tellGradio(textarea);
        announce((removed === null ? "Added " + token + " to the " : "Removed " + token + " from the ") + promptName(id));
    }

    function cardOf(event) {
        var path = event.composedPath ? event.composedPath() : [event.target];
        for (var i = 0; i < path.length; i++) {
            var node = path[i];
            if (node.classList && node.classList.contains("ti-card") && node.dataset && node.dataset.tiName) {
                return node;
            }
        }
        return null;
    }

    function onFocus(event) {
        var target = event.composedPath ? event.composedPath()[0] : event.target;
        if (target && target.tagName === "TEXTAREA") {
            lastPromptId = promptIdOf(target) || lastPromptId;
        }
    }

    // Cards are <button>s, so Enter and Space arrive here as clicks too.
    function onClick(event) {
        var card = cardOf(event);
        if (card) {
            event.preventDefault();
            toggleToken(card.dataset.tiName, card.dataset.tiNegative === "1");
        }
    }

    // After the tab writes an embedding file (Create, or the end of a run), the web UI's own extra-networks
    // card lists are stale: A1111 builds their HTML once and rebuilds it only from its Refresh button,
    // which clicks a hidden button per list ("txt2img_textual_inversion_extra_refresh_internal", and
    // img2img's). Click those, as that Refresh does. A file was written when the Create status turns "ok",
    // or when the Train tab's result box gets a path (it is empty while a run goes), or a rename, delete or
    // promoted snapshot says "ok".
    var lastWritten = null;

    function writtenNow() {
        var root = appRoot();
        var created = root.querySelector("#ti_create_status .ti-status-ok");
        var result = root.querySelector("#ti_train_result textarea, #ti_train_result input");
        // A rename, delete (Embeddings tab) or snapshot promoted (Train tab) says so in its own status.
        var changed = root.querySelectorAll("#ti_embeddings_file_status .ti-status-ok, #ti_snapshot_status .ti-status-ok");
        var files = Array.prototype.map.call(changed, function (element) { return element.textContent; }).join("\n");
        return {created: created ? created.textContent : "", trained: result ? result.value : "", files: files};
    }

    function refreshHostCards() {
        var buttons = appRoot().querySelectorAll('[id$="_textual_inversion_extra_refresh_internal"]');
        if (!buttons.length) {
            // SD.Next: a networks panel per generate view, each re-listed by its own refresh button (its
            // embedding database is reloaded already: the listing is what is stale).
            buttons = appRoot().querySelectorAll("#control_extra_refresh, #txt2img_extra_refresh, #img2img_extra_refresh");
        }
        for (var i = 0; i < buttons.length; i++) {
            buttons[i].dispatchEvent(new Event("click"));
        }
    }

    function checkWritten() {
        var now = writtenNow();
        var before = lastWritten;
        lastWritten = now;
        if (before === null) {
            return; // what the page was built with
        }
        if ((now.created && now.created !== before.created) || (now.trained && now.trained !== before.trained) ||
            (now.files && now.files !== before.files)) {
            refreshHostCards();
        }
    }

    // The Train tab's progress: a click on its hidden update button (ti_ui.compat.poll_every_second) about once a
    // second while the tab is on screen, or while a run goes (its Interrupt button is enabled), so the end
    // of a run reaches this page (and refreshHostCards) wherever the user is. One click at a time: the
    // next waits for the answer to the last (the "ti-poll-done" event), or for POLL_LOST_MS if an answer
    // never comes. This is gradio 3's path (A1111, SD.Next), whose queues drop every= events; on gradio 4.40
    // and newer the tab uses gr.Timer and has no such button.
    var POLL_MS = 1000;
    var POLL_LOST_MS = 15000;
    var pollSent = 0;
    var pollDone = 0;

    function buttonIn(id) {
        var element = byId(id);
        if (element && element.tagName !== "BUTTON") {
            element = element.querySelector("button");
        }
        return element;
    }

    function trainingRuns() {
        var interrupt = buttonIn("ti_train_interrupt");
        return !!interrupt && !interrupt.disabled;
    }

    function pollProgress() {
        var now = Date.now();
        if (document.hidden || (pollSent && now - pollSent < POLL_LOST_MS) || now - pollDone < POLL_MS) {
            return;
        }
        var button = buttonIn("ti_train_poll");
        if (!button || !(shown(byId("ti_train_progress")) || trainingRuns())) {
            return;
        }
        pollSent = now;
        button.click();
    }

    function onPollDone() {
        pollSent = 0;
        pollDone = Date.now();
    }

    // SD.Next's Modern UI makes a left-bar button per extension tab, labelled from the tab's id with
    // "tab_" and "_tab" cut off: "ti" for ours (id ti_tab, which stays: it is public). Name it.
    var TAB_TITLE = "Textual Inversion";

    function labelTabButton() {
        var button = document.querySelector('button[tabitemid*="#tab_ti_tab_tabitem"]');
        var label = button && button.querySelector("span");
        if (label && label.textContent !== TAB_TITLE) {
            label.textContent = TAB_TITLE;
            button.setAttribute("title", TAB_TITLE);
        }
    }

    // Vectors per token: a typed value out of range gets the one-line error the command line gives. The
    // slider clamps it (gradio 6 on leaving the box, without a word) or the server never sees it, so it is
    // said here, as it is typed, and stays until a value in range is typed.
    var MAX_VECTORS = 75;

    function onVectorsTyped(event) {
        var input = event.target;
        if (!input || input.type !== "number" || !input.closest || !input.closest("#ti_create_vectors")) {
            return;
        }
        var slider = input.closest("#ti_create_vectors");
        var message = document.getElementById("ti_create_vectors_error");
        var raw = input.value.trim();
        var count = Number(raw);
        var bad = raw !== "" && !(Number.isInteger(count) && count >= 1 && count <= MAX_VECTORS);
        if (!bad) {
            if (message) {
                message.remove();
            }
            return;
        }
        if (!message) {
            message = document.createElement("div");
            message.id = "ti_create_vectors_error";
            message.className = "ti-status ti-status-error";
            slider.insertAdjacentElement("afterend", message);
        }
        message.textContent = "vectors per token must be between 1 and " + MAX_VECTORS + ", not " + raw;
    }

    function tick() {
        checkWritten(); // on a timer too: a web UI's after-update hook is debounced, and a busy page can starve it
        pollProgress();
        noteShownPrompt();
        labelTabButton();
    }

    function start() {
        document.addEventListener("focusin", onFocus, true);
        document.addEventListener("click", onClick, false);
        document.addEventListener("ti-poll-done", onPollDone);
        document.addEventListener("input", onVectorsTyped, true);
        if (typeof onAfterUiUpdate === "function") {
            onAfterUiUpdate(checkWritten); // the web UI's hook: soon after its page changed (debounced)
        }
        tick();
        setInterval(tick, 500);
    }

    if (typeof onUiLoaded === "function") {
        onUiLoaded(start); // a web UI: after its page is built
    } else if (document.readyState === "loading") {
        document.addEventListener("DOMContentLoaded", start);
    } else {
        start(); // the standalone app runs this file after the page has loaded
    }
})();
