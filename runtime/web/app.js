// Placeholder: the front-end replaces this file. Reads the selected path from <body data-path>.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  const path = document.body.dataset.path || "";
  fetch("/api/v1/browse?path=" + encodeURIComponent(path)).then((r) => r.json()).then((page) => {
    const ul = document.createElement("ul");
    for (const t of page.twins || []) {
      const li = document.createElement("li");
      li.textContent = t.path;
      ul.appendChild(li);
    }
    document.getElementById("app").appendChild(ul);
  });
});
