// Burn-down charts: each <canvas data-burndown="ID"> reads the JSON data block ID
// (rendered by the server) and draws granted / used / projected with Chart.js.
// The page works without this script: the same numbers are in tables.
(function () {
  "use strict";
  window.aifaCharts = {};
  function draw(canvas) {
    var block = document.getElementById(canvas.dataset.burndown);
    if (!block || typeof window.Chart === "undefined") { return; }
    var d = JSON.parse(block.textContent);
    var chart = new window.Chart(canvas, {
      type: "line",
      data: {
        labels: d.labels,
        datasets: [
          { label: "Granted (" + d.unit + ")", data: d.granted, borderColor: "#57606a", borderDash: [6, 4], pointRadius: 0, stepped: true },
          { label: "Used (" + d.unit + ")", data: d.used, borderColor: "#0b57d0", backgroundColor: "rgba(11,87,208,0.12)", fill: true, pointRadius: 0 },
          { label: "Projected (" + d.unit + ")", data: d.projected, borderColor: "#b3261e", borderDash: [2, 3], pointRadius: 0 }
        ]
      },
      options: {
        animation: false, responsive: true, maintainAspectRatio: false, spanGaps: false,
        interaction: { mode: "index", intersect: false },
        scales: { x: { ticks: { maxTicksLimit: 12 } }, y: { beginAtZero: true, title: { display: true, text: d.unit } } }
      }
    });
    window.aifaCharts[String(d.allocation_id)] = chart;
    canvas.dataset.rendered = "true";
  }
  function init() {
    var canvases = document.querySelectorAll("canvas[data-burndown]");
    for (var i = 0; i < canvases.length; i++) { draw(canvases[i]); }
  }
  if (document.readyState === "loading") { document.addEventListener("DOMContentLoaded", init); } else { init(); }
}());
