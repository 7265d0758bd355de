"""The Parameters tab is built when a page first opens it (gui/tabs/parameters_page.py). Before that, the page's form
is already the user's last one (other tabs read its config) and "Use in Parameters" in another tab goes into it;
the form then shows both when the tab is opened. Clicked through in Chromium."""

from __future__ import annotations

import pytest
from conftest import field, open_section, open_tab
from playwright.sync_api import expect

from gui.form_store import LOCAL_USER, FormStore

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def test_the_form_is_restored_and_patched_before_the_tab_is_built(browser, app_server, work_dir, tiny_models):
    model = str(tiny_models["sd1"])
    # The user's last form, as an earlier page kept it.
    FormStore(app_server["runs_dir"]).save(LOCAL_USER, {"model.pretrained_model_name_or_path": model,
                                                        "network.network_dim": 24})
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    try:
        page = context.new_page()
        page.goto(app_server["url"])
        page.wait_for_selector("#app-header")
        open_tab(page, "Regularization")
        # The Regularization tab's empty model takes the Parameters config's: the restored form's.
        expect(page.locator("#reg-model textarea")).to_have_value(model)
        assert page.locator("#validation-status").count() == 0, "the Parameters form was built before its opening"
        reg = work_dir / "reg"
        page.locator("#reg-parent textarea").fill(str(reg))
        page.locator("#reg-apply").click()
        expect(page.locator("#reg-message")).to_contain_text(str(reg))

        open_tab(page, "Parameters")
        expect(page.locator("#preset-message")).to_contain_text("Set from another tab")
        expect(page.locator("#preset-message")).to_contain_text("dataset.reg_data_dir")
        preview = page.locator("#toml-preview")
        expect(preview).to_contain_text("network_dim = 24")
        expect(preview).to_contain_text(f'reg_data_dir = "{reg}"')
        open_section(page, "Network")
        expect(page.locator("#field-network-network_dim input[type=number]")).to_have_value("24")
        open_section(page, "Dataset")
        expect(field(page, "dataset.reg_data_dir").locator("textarea").first).to_have_value(str(reg))

        # Once built, a patch still reaches the widgets.
        open_tab(page, "Regularization")
        other = work_dir / "reg2"
        page.locator("#reg-parent textarea").fill(str(other))
        page.locator("#reg-apply").click()
        expect(page.locator("#reg-message")).to_contain_text(str(other))
        open_tab(page, "Parameters")
        expect(field(page, "dataset.reg_data_dir").locator("textarea").first).to_have_value(str(other))
        expect(preview).to_contain_text(f'reg_data_dir = "{other}"')
    finally:
        context.close()
        (app_server["runs_dir"] / ".atelier" / "form-local.json").unlink(missing_ok=True)
