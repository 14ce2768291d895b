// ReDoc from the app's own files (no CDN, no inline script: the page's CSP forbids both).
"use strict";
window.addEventListener("DOMContentLoaded", () => {
  Redoc.init(document.body.dataset.spec, {}, document.getElementById("redoc"));
});
