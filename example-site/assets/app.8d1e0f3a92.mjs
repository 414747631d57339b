document.documentElement.dataset.edge = "ready";
