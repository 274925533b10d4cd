// Progressive enhancement only: every page works without this file.
// Ticking or unticking "Two-Factor Authentication" goes straight to the Password window.
document.addEventListener("DOMContentLoaded", function () {
  var form = document.querySelector("form[data-autosubmit]");
  if (!form) { return; }
  var box = form.querySelector("input[type=checkbox]");
  if (box) { box.addEventListener("change", function () { form.submit(); }); }
});
