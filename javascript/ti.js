// Textual Inversion tab: clicking an embedding card adds its token to the last-focused prompt, and a
// second click removes it, as the web UIs' own extra-network cards do.
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

    // Prompt boxes a card may write into: ours (standalone) first, then the host's txt2img/img2img ones.
    var PROMPT_IDS = [
        "ti_try_prompt", "ti_try_negative",
        "txt2img_prompt", "txt2img_neg_prompt", "img2img_prompt", "img2img_neg_prompt"
    ];
    var PROMPT_NAMES = {
        ti_try_prompt: "Try-it prompt", ti_try_negative: "Try-it negative prompt",
        txt2img_prompt: "txt2img prompt", txt2img_neg_prompt: "txt2img negative prompt",
        img2img_prompt: "img2img prompt", img2img_neg_prompt: "img2img negative prompt"
    };
    var lastPromptId = null;

    function appRoot() {
        return typeof gradioApp === "function" ? gradioApp() : document;
    }

    function promptTextarea(id) {
        return appRoot().querySelector("#" + id + " textarea");
    }

    function promptIdOf(element) {
        for (var i = 0; i < PROMPT_IDS.length; i++) {
            if (element.closest && element.closest("#" + PROMPT_IDS[i])) {
                return PROMPT_IDS[i];
            }
        }
        return null;
    }

    function targetPromptId() {
        if (lastPromptId && promptTextarea(lastPromptId)) {
            return lastPromptId;
        }
        for (var i = 0; i < PROMPT_IDS.length; i++) {
            if (PROMPT_IDS[i].indexOf("neg") < 0 && promptTextarea(PROMPT_IDS[i])) {
                return PROMPT_IDS[i];
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

    function toggleToken(token) {
        var id = targetPromptId();
        var textarea = id && promptTextarea(id);
        if (!textarea) {
            announce("No prompt box found to add " + token + " to.");
            return;
        }
        var removed = withoutToken(textarea.value, token);
        textarea.value = removed === null ? withToken(textarea.value, token) : removed;
        tellGradio(textarea);
        announce((removed === null ? "Added " + token + " to the " : "Removed " + token + " from the ") + PROMPT_NAMES[id]);
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
            toggleToken(card.dataset.tiName);
        }
    }

    function start() {
        document.addEventListener("focusin", onFocus, true);
        document.addEventListener("click", onClick, false);
    }

    if (typeof onUiLoaded === "function") {
        onUiLoaded(start); // a web UI: after its page is built
    } else if (document.readyState === "loading") {
        document.addEventListener("DOMContentLoaded", start);
    } else {
        start(); // the standalone app runs this file after the page has loaded
    }
})();
